import copy

import pytest

from stages.core.prompts import PromptTemplate, encode_pairs, example_texts, prompt_text, user_turn
from tests.conftest import DIRECTIVE

MODEL_CARD_DIRECTIVE = r"Please reason step by step, and put your final answer within \boxed{}."


def test_the_default_directive_is_the_model_cards_sentence():
    assert DIRECTIVE == MODEL_CARD_DIRECTIVE


def test_the_directive_follows_the_problem_on_its_own_line(tokenizer):
    assert user_turn("What is 2+2?", MODEL_CARD_DIRECTIVE) == f"What is 2+2?\n{MODEL_CARD_DIRECTIVE}"
    expected = f"<｜begin▁of▁sentence｜><｜User｜>What is 2+2?\n{MODEL_CARD_DIRECTIVE}<｜Assistant｜><think>\n"
    assert prompt_text(tokenizer, "What is 2+2?", directive=MODEL_CARD_DIRECTIVE) == expected


def test_an_empty_directive_gives_the_templates_prompt_of_the_bare_problem(tokenizer):
    assert user_turn("What is 2+2?", "") == "What is 2+2?"
    expected = "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n"
    assert prompt_text(tokenizer, "What is 2+2?", directive="") == expected


def test_training_example_keeps_the_reasoning_that_the_template_would_drop(tokenizer):
    reasoning, answer = "I add 2 and 2. Wait, yes: 4.", "The answer is $\\boxed{4}$."
    rendered_by_template = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}], tokenize=False)
    assert reasoning not in rendered_by_template  # the trap this module exists to avoid

    prompt, completion = example_texts(tokenizer, "What is 2+2?", reasoning, answer, directive=DIRECTIVE)
    assert prompt == prompt_text(tokenizer, "What is 2+2?", directive=DIRECTIVE)
    assert completion == f"{reasoning}\n</think>\n\n{answer}<｜end▁of▁sentence｜>"
    assert (prompt + completion).count("<think>") == 1


def test_completion_encodes_the_end_of_sequence_as_its_special_token(tokenizer):
    prompt, completion = encode_pairs(tokenizer, [example_texts(tokenizer, "What is 2+2?", "2+2=4", "4",
                                                                directive=DIRECTIVE)])
    assert completion[0].ids[-1] == tokenizer.eos_token_id
    assert prompt[0].ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_tokens_to_ids("<think>") in prompt[0].ids


PROBLEMS = ["What is 2+2?", "  Find $x$ if\n\n$x^2 = 4$.  ", "", "{{ x }} {% raw %} <｜User｜> \\boxed{}", "ünï ☃"]


@pytest.mark.parametrize("directive", [MODEL_CARD_DIRECTIVE, ""])
def test_the_prompt_template_renders_what_the_chat_template_renders(tokenizer, directive):
    template = PromptTemplate.of(tokenizer, directive)
    assert template is not None
    for problem in PROBLEMS:
        assert template(problem) == prompt_text(tokenizer, problem, directive=directive)


def test_a_chat_template_that_rewrites_the_user_turn_has_no_prompt_template(tokenizer):
    trimming = copy.copy(tokenizer)
    trimming.chat_template = tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    assert "| trim" in trimming.chat_template
    assert prompt_text(trimming, "  x  ", directive="") != prompt_text(tokenizer, "  x  ", directive="")
    assert PromptTemplate.of(trimming, DIRECTIVE) is None
