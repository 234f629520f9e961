"""The instruction template: training records and inference prompts. Pure (no heavy imports).

Default layout (Alpaca-style):

    Classify the text into 'Positive', 'Negative', and return the answer as the predicted sentiment.
    ### Input:
    {sentence}
    ### Response:
    {label}<eos>
"""

from __future__ import annotations

from dataclasses import dataclass

from sentiment_ray.config import PromptConfig


@dataclass(frozen=True)
class PromptTemplate:
    instruction: str
    input_template: str
    response_header: str
    separator: str = "\n"

    @classmethod
    def from_config(cls, cfg: PromptConfig) -> PromptTemplate:
        return cls(cfg.instruction, cfg.input_template, cfg.response_header, cfg.separator)

    def prompt(self, sentence: str) -> str:
        """Everything up to and including the response header: what the model continues."""
        body = self.input_template.replace("{sentence}", sentence)
        return f"{self.instruction}{self.separator}{body}{self.separator}{self.response_header}"

    def markers(self) -> list[str]:
        """The template's own structural lines: each non-blank line of the input template
        around `{sentence}` and of the response header (`### Input:`, `### Response:`). A
        text holding one can pass for the template's structure (e.g. a fake answer)."""
        found: list[str] = []
        for part in [*self.input_template.split("{sentence}"), self.response_header]:
            for line in part.splitlines():
                line = line.strip()
                if line and line not in found:
                    found.append(line)
        return found

    def completion(self, label: str, eos_token: str) -> str:
        return f"{label}{eos_token}"

    def full_text(self, sentence: str, label: str, eos_token: str) -> str:
        """The full-text training record: instruction + input + label + EOS in one string."""
        return self.prompt(sentence) + self.completion(label, eos_token)

    def prompt_completion(self, sentence: str, label: str, eos_token: str) -> dict[str, str]:
        """A TRL prompt-completion record (loss on the completion only)."""
        return {"prompt": self.prompt(sentence), "completion": self.completion(label, eos_token)}
