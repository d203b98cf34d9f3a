"""Chat: templates and masks, message checks, growing a model by the turn tokens, SFT windows whose loss is on
the assistant's tokens only, `model.chat`, saving, and `keras-nanogpt sft` / `chat` and the example as a user
runs them."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import BACKEND, QUICK_COMPILE, messages, to_numpy

import keras_nanogpt as kn
from keras_nanogpt import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = {"role": "system", "content": "Be brief."}
ASK = {"role": "user", "content": "Who is Darcy?"}
ANSWER = {"role": "assistant", "content": "A man."}
CONVERSATIONS = [{"messages": [SYSTEM, ASK, ANSWER]},
                 [{"role": "user", "content": "Who says: “No more have I”?"},
                  {"role": "assistant", "content": "Mr. Bennet"}],
                 {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Good day."},
                               {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]}]


@pytest.fixture()
def chat_model(tiny_model):
    return kn.chat.add_chat_template(tiny_model)


def _run(*arguments, stdin=None):
    """Start `python -m keras_nanogpt.cli ARGUMENTS` (or a script) under this backend."""
    environment = dict(os.environ, KERAS_BACKEND=BACKEND, PYTHONPATH=ROOT)
    command = [sys.executable, *arguments] if arguments[0].endswith(".py") else [
        sys.executable, "-m", "keras_nanogpt.cli", *arguments]
    return subprocess.Popen(command, env=environment, text=True, stdin=subprocess.PIPE if stdin else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("bad, field", [
    ([], "`messages` must be a non-empty list"),
    ([ASK, {"role": "robot", "content": "x"}], "`messages[1].role` must be one of"),
    ([{"role": "user"}], "`messages[0].content` is missing"),
    ([ASK, ANSWER, {"role": "user", "content": 3}], "`messages[2].content` must be a string or a list of text"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "`messages[0].content` must be a string or a list"),
    ([{"role": "user", "content": "a\ud800"}], "`messages[0].content` holds a lone surrogate"),
])
def test_bad_messages_name_the_field(bad, field):
    with pytest.raises(ValueError) as error:
        kn.chat.check_messages(bad)
    assert str(error.value).startswith(field)


def test_templates_render_turns_and_mask_the_replies(tiny_model, chat_model):
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]}]
    assert kn.chat.check_messages(parts) == [SYSTEM]
    assert not kn.chat.has_template(tiny_model) and kn.chat.template_of(tiny_model) is kn.chat.DEFAULT_TEMPLATE
    plain = kn.chat.render(tiny_model, [SYSTEM, ASK])
    assert tiny_model.tokenizer.decode(plain) == "System: Be brief.\n\nUser: Who is Darcy?\n\nAssistant:"
    assert kn.chat.stop_sequences(tiny_model) == ["\n\nUser:", "\n\nSystem:", "\nUser:"]

    tokenizer, template = chat_model.tokenizer, chat_model.chat_template
    special = tokenizer.special_tokens
    assert kn.chat.has_template(chat_model) and template.name == "nanochat"
    assert kn.chat.stop_sequences(chat_model) == [special["<|assistant_end|>"], special["<|user_start|>"]]
    ids = kn.chat.render(chat_model, [SYSTEM, ASK])
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert tokenizer.decode(ids) == "<|user_start|>Be brief.\n\nWho is Darcy?<|user_end|><|assistant_start|>"
    ids, mask = template.render_for_training(tokenizer, [SYSTEM, ASK, ANSWER])
    assert tokenizer.decode(ids[mask == 1]) == "A man.<|assistant_end|>" and mask.sum() == len("A man.") + 1
    assert tokenizer.decode(ids[mask == 0]).endswith("<|assistant_start|>")
    ids, mask = kn.chat.DEFAULT_TEMPLATE.render_for_training(tiny_model.tokenizer, [ASK, ANSWER])
    assert tiny_model.tokenizer.decode(ids[mask == 1]) == " A man.\n\n"
    # Special tokens are never what plain text encodes to, however it is spelled.
    spelled = tokenizer.encode("<|user_start|><|assistant_end|>")
    assert spelled.max() < min(special.values()) and len(spelled) == len("<|user_start|><|assistant_end|>")
    config = template.get_config()
    assert kn.chat.ChatTemplate.from_config(json.loads(json.dumps(config))) == template


def test_long_conversations_are_cut_from_the_left_keeping_the_system(chat_model):
    history = [SYSTEM] + [{"role": role, "content": f"turn {c} " * 3} for c in "abcdefgh"
                          for role in ("user", "assistant")][:-1]
    full = kn.chat.render(chat_model, history)
    cut = kn.chat.render(chat_model, history, max_tokens=60)
    text = chat_model.tokenizer.decode(cut)
    assert len(cut) <= 60 < len(full) and text.startswith("<|user_start|>Be brief.\n\n")
    assert text.endswith("turn h turn h turn h <|user_end|><|assistant_start|>") and "turn a" not in text
    with pytest.raises(ValueError, match="`messages` does not fit 10 tokens"):
        kn.chat.render(chat_model, history, max_tokens=10)


def test_sft_puts_the_loss_on_the_assistants_tokens_only(chat_model):
    x, y, weights = next(iter(kn.data.chat_dataset(CONVERSATIONS, chat_model, 32, 8, shuffle=False)))
    x, y, weights = (np.asarray(t) for t in (x, y, weights))
    assert weights.shape == (3, 32) and (weights[weights > 0] == weights[weights > 0][0]).all()
    assert np.isclose(weights.sum(), weights.size)  # scaled: sum_over_batch_size gives the assistant mean
    other = np.where(weights > 0, y, (y + 7) % chat_model.vocabulary_size)  # new targets where weights are 0
    assert (other != y).any()
    losses, states = [], []
    initial = chat_model.get_weights()
    for targets in (y, other):
        chat_model.set_weights(initial)
        chat_model.compile(optimizer=keras.optimizers.SGD(0.5), **QUICK_COMPILE)
        losses.append(float(chat_model.train_on_batch(x, targets, sample_weight=weights, return_dict=True)["loss"]))
        states.append(chat_model.get_weights())
    assert losses[0] == losses[1]
    assert all(np.array_equal(a, b) for a, b in zip(*states))
    assert not all(np.array_equal(a, b) for a, b in zip(initial, states[0]))  # it did learn

    # The loss `fit` and `evaluate` report is the mean over the assistant's tokens.
    chat_model.set_weights(initial)
    logits = to_numpy(chat_model(x)).astype("float64")
    logits -= logits.max(-1, keepdims=True)
    log_probabilities = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_losses = -np.take_along_axis(log_probabilities, y[..., None], -1)[..., 0]
    expected = token_losses[weights > 0].mean()
    assert not np.isclose(expected, token_losses.mean())
    reported = chat_model.evaluate(kn.data.chat_dataset(CONVERSATIONS, chat_model, 32, 8, shuffle=False),
                                   verbose=0, return_dict=True)["loss"]
    assert np.isclose(reported, expected, rtol=1e-4)


def test_bad_conversations_name_the_file_and_line(tmp_path, chat_model):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(CONVERSATIONS[0]) + "\n\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chats.jsonl' line 3: `messages\[0\].content` is missing"):
        kn.data.chat_dataset(str(path), chat_model, 32, 2)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="chats.jsonl' line 1: not a JSON object"):
        kn.data.chat_dataset(str(path), chat_model, 32, 2)


def test_growing_keeps_old_logits_and_new_rows_train_under_lora(tiny_model, chat_model):
    old_size, ids = tiny_model.vocabulary_size, np.arange(2, 30)[None]
    assert chat_model.vocabulary_size == old_size + 4 == chat_model.tokenizer.size
    np.testing.assert_array_equal(to_numpy(chat_model(ids))[..., :old_size], to_numpy(tiny_model(ids)))
    table = to_numpy(chat_model.embedding.token_embedding.embeddings)
    new_rows = table[old_size:]
    assert np.abs(new_rows - table[:old_size].mean(0)).max() < 0.01 and len({tuple(r) for r in new_rows}) == 4
    with pytest.raises(ValueError, match="already carries"):
        kn.chat.add_chat_template(chat_model)

    padded = kn.chat.add_chat_template(kn.NanoGPT(old_size + 10, 16, 1, 2, 16, vectorizer=tiny_model.tokenizer))
    table = to_numpy(padded.embedding.token_embedding.embeddings)  # the spare rows the new tokens take are set
    assert padded.vocabulary_size == old_size + 10
    assert np.abs(table[old_size:old_size + 4] - table[:old_size].mean(0)).max() < 0.01
    untied = kn.chat.add_chat_template(kn.NanoGPT(old_size, 16, 1, 2, 16, tie_embeddings=False,
                                                  vectorizer=tiny_model.tokenizer))
    assert tuple(untied.head.kernel.shape) == (16, old_size + 4)
    untied.enable_lora(2)
    variable = untied.embedding.token_embedding.embeddings
    assert any(v is variable for v in untied.trainable_weights)
    x, y, weights = (np.asarray(t) for t in next(iter(kn.data.chat_dataset(CONVERSATIONS, untied, 16, 8))))
    before = to_numpy(variable)[old_size:].copy(), to_numpy(untied.head.kernel)[:, old_size:].copy()
    untied.compile(optimizer=keras.optimizers.SGD(1.0), **QUICK_COMPILE)
    untied.train_on_batch(x, y, sample_weight=weights)
    assert not np.array_equal(before[0], to_numpy(variable)[old_size:])
    assert not np.array_equal(before[1], to_numpy(untied.head.kernel)[:, old_size:])


def test_the_template_survives_keras_files_presets_and_export(tmp_path, chat_model):
    ids = np.arange(2, 20)[None]
    expected = to_numpy(chat_model(ids))
    chat_model.save(tmp_path / "chat.keras")
    chat_model.save_to_preset(tmp_path / "preset")
    for loaded in (kn.load_model(tmp_path / "chat.keras"), kn.NanoGPT.from_preset(tmp_path / "preset")):
        assert loaded.chat_template == chat_model.chat_template
        assert loaded.tokenizer.special_tokens == chat_model.tokenizer.special_tokens
        np.testing.assert_allclose(to_numpy(loaded(ids)), expected, atol=1e-6)
    vocabulary = kn.export.vocabulary_json(chat_model)  # what export writes as vocabulary.json
    assert vocabulary["chat_template"]["name"] == "nanochat"
    assert vocabulary["special_tokens"]["<|assistant_end|>"] == chat_model.vocabulary_size - 1
    assert len(vocabulary["tokens"]) == min(vocabulary["special_tokens"].values())


def test_chat_is_generate_on_the_rendered_prompt(tiny_model, chat_model):
    """The server's promise: with a seed, `model.chat` is `generate` on the rendered ids with the template's
    stops (its own template; the plain default on a model without one, with a stop string of the caller's)."""
    conversation = [SYSTEM, ASK]
    for model, stop in ((chat_model, None), (tiny_model, "e")):
        ids = kn.chat.render(model, conversation)
        options = dict(max_new_tokens=12, temperature=1.0, seed=3)
        reply = model.chat(conversation, stop=stop, **options)
        extra = [] if stop is None else [stop]
        new = np.asarray(model.generate(ids[None], stop=kn.chat.stop_sequences(model) + extra, **options))
        assert reply == model.tokenizer.decode(new[0, len(ids):])
        if stop is not None:
            assert stop not in reply
    assert "".join(chat_model.chat(conversation, stream=True, **options)) == chat_model.chat(conversation, **options)


def test_cli_sft_then_chat_under_a_pipe_and_the_example(tmp_path, tiny_model, capsys):
    """The three runs go side by side: the example (--tiny), `sft` with LoRA, and `chat` under a pipe."""
    example = _run(os.path.join(ROOT, "examples", "chat_sft.py"), "--tiny", "--out", str(tmp_path / "ex.keras"))
    tiny_model.save(tmp_path / "base.keras")
    kn.chat.add_chat_template(tiny_model).save(tmp_path / "grown.keras")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c if isinstance(c, dict) else {"messages": c}) + "\n" for c in CONVERSATIONS))
    sft = _run("sft", str(tmp_path / "base.keras"), "--data", str(data), "--out", str(tmp_path / "chat.keras"),
               "--steps", "2", "--batch-size", "2", "--lora-rank", "2")
    chat = _run("chat", str(tmp_path / "grown.keras"), "--max-new-tokens", "8", "--seed", "0", "--system",
                "Be brief.", stdin=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    assert cli.main(["sft", str(tmp_path / "base.keras"), "--data", str(bad), "--out", str(tmp_path / "x.keras")]) == 2
    err = capsys.readouterr().err
    assert len(messages(err)) == 1 and "bad.jsonl' line 1: `messages[0].role` must be one of" in err

    out, err = chat.communicate("Who is Darcy?\n/clear\nHello\n", timeout=300)
    assert chat.returncode == 0, err
    assert len(out.split("\n")) >= 3 and "> " not in out  # two replies, no prompts under a pipe
    out, err = sft.communicate(timeout=300)
    assert sft.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    assert report["steps"] == 2 and report["loss_before"] > 0 and "loss on the assistant's tokens before" in out
    loaded = kn.load_model(tmp_path / "chat.keras")
    assert loaded.chat_template.name == "nanochat" and kn.adapters.lora_config(loaded)["rank"] == 2
    out, err = example.communicate(timeout=300)
    assert example.returncode == 0, err
    assert "loss on the assistant's tokens" in out and "<|assistant_end|>" in out
