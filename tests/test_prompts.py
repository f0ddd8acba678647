from stages.prompts import encode_pairs, example_texts, prompt_text


def test_prompt_is_the_templates_generation_prompt(tokenizer):
    expected = "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n"
    assert prompt_text(tokenizer, "What is 2+2?") == expected


def test_training_example_keeps_the_reasoning_that_the_template_would_drop(tokenizer):
    reasoning, answer = "I add 2 and 2. Wait, yes: 4.", "The answer is $\\boxed{4}$."
    rendered_by_template = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}], tokenize=False)
    assert reasoning not in rendered_by_template  # the trap this module exists to avoid

    prompt, completion = example_texts(tokenizer, "What is 2+2?", reasoning, answer)
    assert prompt == prompt_text(tokenizer, "What is 2+2?")
    assert completion == f"{reasoning}\n</think>\n\n{answer}<｜end▁of▁sentence｜>"
    assert (prompt + completion).count("<think>") == 1


def test_completion_encodes_the_end_of_sequence_as_its_special_token(tokenizer):
    prompt, completion = encode_pairs(tokenizer, [example_texts(tokenizer, "What is 2+2?", "2+2=4", "4")])
    assert completion[0].ids[-1] == tokenizer.eos_token_id
    assert prompt[0].ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_tokens_to_ids("<think>") in prompt[0].ids
