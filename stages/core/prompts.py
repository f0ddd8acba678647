"""The chat format shared by filtering, training and evaluation: the base model's own template.

The R1-Distill template drops everything before `</think>` from assistant turns, so the assistant
part is never rendered through it: the template renders the prompt, and the completion is appended.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def user_turn(problem: str, directive: str) -> str:
    r"""The user message: the problem, then the directive on its own line; an empty directive: the bare problem.

    DeepSeek-R1's README (Usage Recommendations) advises a directive such as "Please reason step by step, and
    put your final answer within \boxed{}." inside the user prompt (no system prompt) but not where; we use
    DeepSeek-Math's form for that sentence, `{question}\n{directive}` (its README and
    evaluation/run_subset_parallel.py). open-r1 evaluates with lighteval's math_500 task instead, whose own
    instruction (adapted from simple-evals) comes before the problem.
    """
    return f"{problem}\n{directive}" if directive else problem


def prompt_text(tokenizer, problem: str, *, directive: str) -> str:
    """The exact text the model sees before it answers: template user turn + generation prompt."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_turn(problem, directive)}], tokenize=False, add_generation_prompt=True
    )


@dataclass(frozen=True)
class PromptTemplate:
    """prompt_text without rendering the chat template per problem: the template rendered once around a
    marker, the user turn put in its place. Plain strings, so it travels to worker processes without
    transformers (whose import costs seconds)."""
    head: str
    tail: str
    directive: str
    MARKER = "\x00problem\x00"
    # Problems that a template which trims, escapes or otherwise rewrites the user turn renders differently
    PROBES = ("What is 1 + 1?", "  spaced\n\n problem \t", "", "{{ raw }} {% if %} <|x|> \\boxed{}")

    @classmethod
    def of(cls, tokenizer, directive: str) -> PromptTemplate | None:
        """The template of this tokenizer's prompts, or None if its chat template does not place the user
        turn verbatim (then prompt_text must render each problem) or has none."""
        if not getattr(tokenizer, "chat_template", None):
            return None
        rendered = prompt_text(tokenizer, cls.MARKER, directive="")
        if rendered.count(cls.MARKER) != 1:
            return None
        template = cls(*rendered.split(cls.MARKER), directive)
        if any(template(p) != prompt_text(tokenizer, p, directive=directive) for p in cls.PROBES):
            return None
        return template

    def __call__(self, problem: str) -> str:
        return self.head + user_turn(problem, self.directive) + self.tail


def completion_text(prompt: str, reasoning: str, answer: str, eos_token: str) -> str:
    """What the model should write after `prompt`: reasoning, `</think>`, answer, end of sequence."""
    opener = "" if prompt.endswith(THINK_OPEN + "\n") else THINK_OPEN + "\n"
    return f"{opener}{reasoning}\n{THINK_CLOSE}\n\n{answer}{eos_token}"


def example_texts(tokenizer, problem: str, reasoning: str, answer: str, *, directive: str) -> tuple[str, str]:
    """(prompt, completion) of one training example; loss belongs on the completion only."""
    prompt = prompt_text(tokenizer, problem, directive=directive)
    return prompt, completion_text(prompt, reasoning, answer, tokenizer.eos_token)


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]):
    """(prompt encodings, completion encodings) of rendered (prompt, completion) pairs, each a
    `tokenizers.Encoding` (len() is its token count, .ids its ids). The two parts are encoded apart,
    as the model meets them: the prompt alone at inference, the completion after it.
    """
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: no per-token Python objects
    prompts = backend.encode_batch([p for p, _ in pairs], add_special_tokens=False)
    completions = backend.encode_batch([c for _, c in pairs], add_special_tokens=False)
    return prompts, completions
