"""Where the prompt is built: one function renders it for training, evaluation and prediction.

A prompt has three parts, kept apart so the tokens of the instruction can be shared by a whole batch:

    prefix    the instruction, identical for every question of a task
    question  the question and the cue that asks for the label ("... ? =")
    answer    the label as it follows the cue (" HUM"), then the end-of-answer text (EOS)
"""
from __future__ import annotations

from dataclasses import dataclass

from .task import Task


@dataclass(frozen=True)
class Prompt:
    prefix: str
    question: str
    answer: str = ""   # empty when the label is to be predicted
    end: str = ""      # text that closes an answer (EOS or the chat template's end of turn)

    @property
    def text(self) -> str:
        return self.prefix + self.question + self.answer + (self.end if self.answer else "")


_Q = "\x00QUESTION\x00"
_A = "\x00ANSWER\x00"


def _chat_parts(tokenizer, task: Task) -> tuple[str, str, str]:
    """Split the model's chat template around a question and an answer placeholder."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.template=chat, but the tokenizer has no chat template; use data.template=notebook")
    system = [{"role": "system", "content": task.instruction}, {"role": "user", "content": _Q}]
    folded = [{"role": "user", "content": task.instruction + "\n\n" + _Q}]
    for messages in (system, folded):  # some templates (Mistral's) refuse a system turn
        try:
            text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": _A}], tokenize=False)
            break
        except Exception:
            continue
    else:
        raise ValueError("the tokenizer's chat template could not render a user/assistant exchange")
    prefix, _, rest = text.partition(_Q)
    cue, _, tail = rest.partition(_A)
    bos = tokenizer.bos_token or ""
    if bos and prefix.startswith(bos):  # the tokenizer adds BOS itself
        prefix = prefix[len(bos):]
    return prefix, cue, tail.rstrip()


@dataclass(frozen=True)
class PromptFormat:
    """A template resolved for one task and tokenizer: build it once, render every question with it."""
    prefix: str
    question_fmt: str  # contains {question}
    sep: str           # between the cue and the label
    end: str

    def render(self, question: str, label: str | None = None) -> Prompt:
        """The prompt for one question, with its answer when `label` is given (training)."""
        answer = f"{self.sep}{label}" if label is not None else ""
        return Prompt(self.prefix, self.question_fmt.format(question=question), answer,
                      self.end if label is not None else "")


def prompt_format(template: str, task: Task, tokenizer) -> PromptFormat:
    """The template resolved for `task`'s instruction: the notebook's `[INST] ... [/INST]` or the model's chat."""
    if template == "notebook":
        return PromptFormat(f"[INST] {task.instruction} [/INST]\n", " {question} =", " ", tokenizer.eos_token or "")
    if template == "chat":
        prefix, cue, end = _chat_parts(tokenizer, task)
        return PromptFormat(prefix, "{question}" + cue.replace("{", "{{").replace("}", "}}"), "", end)
    raise ValueError(f"unknown prompt template '{template}' (notebook or chat)")
