"""Build the quickstart's demo model and dataset (no hub access needed).

    .venv/bin/python scripts/build_demo_model.py            # writes examples/demo-model, data

What it makes, deterministically from fixed seeds:
- examples/data/quickstart.jsonl: a support-ticket routing task (alpaca rows). The answer is
  ``team=<billing|shipping|technical|account> priority=<high|normal>``, decided by what the
  ticket is about and whether it sounds urgent. Generated here, so it is ours to license:
  CC0-1.0 (examples/data/LICENSE).
- examples/demo-model: a tiny Llama (hidden 128, 2 layers, GQA, tied embeddings), a
  byte-level BPE tokenizer (~1,700 tokens: the corpus is small) with a chat template,
  briefly pretrained on generic text written below (prose plus simple chat exchanges, never
  the routing task), so the base model speaks the chat format but cannot route tickets:
  the fine-tune has something to learn.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# The completion is the assistant turn plus eos: rendering the prompt with
# add_generation_prompt=True is an exact prefix of the rendering with the answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# ---------------------------------------------------------------------------------------------
# the domain task: support-ticket routing

TEAMS: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my order",
        "my invoice shows the wrong amount",
        "I need a refund for the last payment",
        "the subscription fee went up without notice",
        "my credit card was billed after I cancelled",
        "please send me a receipt for March",
        "there is an unknown charge on my statement",
        "the discount code was not applied to the price",
    ],
    "shipping": [
        "my package has not arrived yet",
        "the tracking number does not work",
        "the parcel was delivered to the wrong address",
        "the box arrived damaged",
        "can I change the delivery date",
        "the courier never showed up",
        "my order is stuck in transit",
        "only half of the items were in the parcel",
    ],
    "technical": [
        "the app crashes when I open it",
        "I get an error message on the settings page",
        "the website is very slow today",
        "the export button does nothing",
        "sync between my phone and laptop is broken",
        "the update failed to install",
        "notifications stopped working",
        "the dashboard shows a blank screen",
    ],
    "account": [
        "I want to change my email address",
        "please delete my account",
        "I forgot my password and cannot reset it",
        "how do I add a second user to my profile",
        "I need to update my phone number",
        "my username is spelled wrong",
        "please merge my two accounts",
        "I want to turn on two factor login",
    ],
}
URGENT = [
    "This is urgent!",
    "Please fix this asap.",
    "I need this solved immediately.",
    "This is blocking my whole team right now.",
    "Urgent: we lose money every hour.",
]
CALM = [
    "No rush.",
    "Whenever you have time.",
    "Thanks in advance.",
    "Just letting you know.",
    "",
]
OPENERS = ["Hi,", "Hello team,", "Good morning.", "Hey there,", "Dear support,", ""]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
CONTEXT = [
    "Order {n}.",
    "My customer id is {n}.",
    "I have been a customer for {k} years.",
    "It started {k} days ago.",
    "",
    "",
]
INSTRUCTION = (
    "Route this support ticket. Answer with team=<billing|shipping|technical|account> "
    "priority=<high|normal>."
)


def make_ticket(rng: random.Random) -> tuple[str, str]:
    team = rng.choice(list(TEAMS))
    urgent = rng.random() < 0.4
    parts = [
        rng.choice(OPENERS),
        rng.choice(TEAMS[team]) + rng.choice([".", "!", ". ", "..."]),
        rng.choice(CONTEXT).format(n=rng.randint(1000, 99999), k=rng.randint(2, 9)),
        rng.choice(URGENT if urgent else CALM),
        rng.choice(["", f"- {rng.choice(NAMES)}", f"Regards, {rng.choice(NAMES)}"]),
    ]
    text = " ".join(p.strip() for p in parts if p.strip())
    return text, f"team={team} priority={'high' if urgent else 'normal'}"


def build_dataset(rows: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    while len(out) < rows:
        text, answer = make_ticket(rng)
        if text in seen:  # duplicates would leak between splits
            continue
        seen.add(text)
        out.append(
            {"id": f"t{len(out):04d}", "instruction": INSTRUCTION, "input": text, "output": answer}
        )
    return out


# ---------------------------------------------------------------------------------------------
# generic pretraining text: prose and simple chat turns (never the routing task)

SUBJECTS = [
    "The cat",
    "A farmer",
    "My sister",
    "The old train",
    "A small bird",
    "The teacher",
    "Our neighbor",
    "The river",
    "A young doctor",
    "The city",
    "The wind",
    "A child",
]
VERBS = [
    "walks to",
    "looks at",
    "thinks about",
    "writes about",
    "runs past",
    "sings near",
    "waits for",
    "reads about",
    "paints",
    "visits",
    "remembers",
    "finds",
]
OBJECTS = [
    "the market",
    "a green field",
    "the quiet library",
    "the blue sea",
    "an old house",
    "the mountain road",
    "a busy station",
    "the garden",
    "a letter",
    "the morning sun",
    "the bridge",
    "a warm kitchen",
]
TIMES = [
    "every morning",
    "in the evening",
    "on Sunday",
    "after the rain",
    "before dinner",
    "at night",
    "in spring",
    "today",
    "once a year",
    "when it is cold",
]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
THINGS = ["apple", "car", "house", "book", "shirt", "flower", "door", "cup", "chair", "kite"]


def prose(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 5)):
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        sentences.append(f"{sentence} {rng.choice(TIMES)}.")
    return " ".join(sentences)


def chat_turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        words = " ".join(rng.choice(THINGS) for _ in range(rng.randint(1, 4)))
        return f"Repeat after me: {words}", words
    if kind == 2:
        color, thing = rng.choice(COLORS), rng.choice(THINGS)
        return f"What color is the {color} {thing}?", f"It is {color}."
    if kind == 3:
        return "Write one sentence about the day.", prose(rng).split(".")[0] + "."
    thing = rng.choice(THINGS)
    return f"Say the word {thing} in capital letters.", thing.upper()


def pretraining_texts(count: int, seed: int, tokenizer_eos: str = "</s>") -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        if rng.random() < 0.5:
            texts.append("<s>" + prose(rng) + tokenizer_eos)
        else:
            question, answer = chat_turn(rng)
            texts.append(f"<s><|user|>\n{question}\n<|assistant|>\n{answer}{tokenizer_eos}")
    return texts


# ---------------------------------------------------------------------------------------------
# tokenizer and model


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL[3:],
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def pretrain(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str], steps: int
) -> float:
    """A short causal-LM run over fixed-length chunks of the generic corpus."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    block = 128
    data = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        batch = data[torch.randint(len(data), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"pretrain step {step:4d} loss {loss.item():.3f}", flush=True)
    model.eval()
    return float(loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "examples/demo-model")
    parser.add_argument("--data", type=Path, default=ROOT / "examples/data/quickstart.jsonl")
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    start = time.monotonic()

    rows = build_dataset(args.rows, seed=1)
    args.data.parent.mkdir(parents=True, exist_ok=True)
    args.data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.data.parent / "LICENSE").write_text(
        "quickstart.jsonl: synthetic support tickets generated by scripts/build_demo_model.py.\n"
        "License: CC0-1.0 (public domain dedication).\n"
        "https://creativecommons.org/publicdomain/zero/1.0/\n"
    )

    texts = pretraining_texts(6000, seed=2)
    # The tokenizer also sees ticket wording (not answers), like a real base model's
    # tokenizer has seen ordinary English.
    corpus = texts + [r["instruction"] + "\n" + r["input"] for r in rows]
    tokenizer = build_tokenizer(corpus, vocab_size=3000)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    final = pretrain(model, tokenizer, texts, args.steps)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    args.model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.model_dir, safe_serialization=True)
    tokenizer.save_pretrained(args.model_dir)
    (args.model_dir / "kubetune-revision").write_text("demo-v1\n")
    (args.model_dir / "README.md").write_text(
        "# kubetune demo model\n\n"
        "A tiny Llama (hidden 128, 2 layers, 4 heads / 2 KV heads, tied embeddings, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters) with a "
        f"{len(tokenizer):,}-token "
        "byte-level BPE tokenizer and a chat template, pretrained for "
        f"{args.steps} steps on generic synthetic text (final loss {final:.2f}).\n"
        "Built by `scripts/build_demo_model.py`; for tests and the quickstart only.\n"
        "License: Apache-2.0.\n"
    )
    print(f"wrote {args.model_dir} and {args.data} in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
