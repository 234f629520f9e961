# The two commands a newcomer needs (README.md): `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test lint test-gpu clean
setup:
	@bash scripts/setup.sh

demo: setup            ## fine-tune the demo model on the demo data, on a local Ray cluster
	$(PY) jobs/train.py

test: setup            ## the CPU test suite (GPU tests skip without CUDA)
	@bash scripts/install_browser.sh   # headless Chromium for the HTML report test
	$(PY) -m pytest -q tests

lint: setup            ## ruff: lint and format check (pyproject.toml [tool.ruff])
	.venv/bin/ruff check sentiment_ray tests jobs benchmarks scripts
	.venv/bin/ruff format --check sentiment_ray tests jobs benchmarks scripts

test-gpu: setup        ## only the GPU tests (run them on a GPU machine)
	$(PY) -m pytest -q tests/gpu

clean:
	rm -rf runs .pytest_cache
