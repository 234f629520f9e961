#!/usr/bin/env bash
# Installs Debian's chromium for the HTML-report test (tests/integration/test_report_html.py renders the
# report in headless Chromium). Called by `make test`. Does nothing when a Chromium is already
# on PATH; without apt-get or root it says so and the test skips with that reason.
set -uo pipefail
for b in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$b" >/dev/null 2>&1; then exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no chromium and no apt-get; the HTML report test will skip" >&2; exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install_browser: not root and no passwordless sudo; the HTML report test will skip" >&2; exit 0
  fi
fi
echo "install_browser: installing chromium (apt-get, once)"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q chromium >/tmp/sentiment-ray-chromium.log 2>&1; then
  $SUDO apt-get update -q >>/tmp/sentiment-ray-chromium.log 2>&1 || true
  $SUDO apt-get install -y -q chromium >>/tmp/sentiment-ray-chromium.log 2>&1 \
    || echo "install_browser: apt-get install chromium failed (see /tmp/sentiment-ray-chromium.log); the HTML report test will skip" >&2
fi
exit 0
