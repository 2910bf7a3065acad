"""Build the tiny byte-level BPE tokenizer shipped in ``preftune/assets/tiny_tokenizer``.

The tiny random models (``tiny-random-llama`` and friends) need a *real* tokenizer so that tests
exercise the same code paths as SmolLM2: byte-level BPE, ChatML special tokens, pad == eos, no BOS,
and a chat template that inserts a default system prompt. Training on the small corpus below is
deterministic, so re-running this script reproduces the committed files byte for byte.

Usage::

    python scripts/build_tiny_tokenizer.py            # writes src/preftune/assets/tiny_tokenizer/
    python scripts/build_tiny_tokenizer.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 1024
# Same ids as SmolLM2: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SYSTEM = "You are a helpful AI assistant."

# SmolLM2's ChatML template with a shorter default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
The capital of France is Paris. The capital of Germany is Berlin. The capital of Japan is Tokyo.
The capital of Italy is Rome, and the capital of Spain is Madrid. London is the capital of England.
You are a helpful AI assistant. I am happy to help you with your question. Here is a short answer.
Thank you for asking! Please let me know if you have any other questions. Sure, here is an example.
What is the weather like today? It is sunny and warm, with a light breeze from the west.
Could you write a short poem about the sea? The sea is wide, the sea is deep, it sings the sailors off to sleep.
Explain why the sky is blue. Sunlight is scattered by the molecules in the air, and blue light is scattered
more than red light because it has a shorter wavelength. This is called Rayleigh scattering.
How do I bake bread? Mix flour, water, salt and yeast. Knead the dough for ten minutes, let it rise for
an hour, shape it, let it rise again, and bake it in a hot oven for about forty minutes.
The movie was wonderful: the acting was great, the story was moving, and the music was beautiful.
The film was terrible. The plot made no sense, the dialogue was boring, and I wanted to leave early.
I loved this book and would recommend it to anyone. I did not enjoy this restaurant; the food was cold.
This product is excellent and works exactly as described. The service was slow and the staff were rude.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 256 1000 2024 3.14 2.718 -7 +5 50% $19.99.
Math: 2 + 2 = 4, 3 * 7 = 21, 10 / 2 = 5, 9 - 4 = 5. The square root of 16 is 4.
def add(a, b):
    return a + b

for i in range(10):
    print(i * i)

import torch
x = torch.zeros(4, 8)
if x.sum() == 0:
    print("all zeros")
{"prompt": "Hello", "chosen": "Hi there!", "rejected": "Go away."}
Reinforcement learning from human feedback trains a reward model on human preferences and then
optimises the policy against it with a penalty on the divergence from a reference model.
Direct preference optimisation skips the reward model: it increases the likelihood of the chosen
response relative to the rejected one, measured against the reference policy.
A language model predicts the next token given the previous tokens. Training minimises the
cross-entropy between the predicted distribution and the actual next token in the data.
Once upon a time, there was a little girl who lived in a village near the forest. Every day she walked
to school with her friends, and every evening she helped her mother cook dinner.
The children played in the park until the sun went down. Then they went home, ate their supper, and
went to bed. Tomorrow would be another day full of games, stories and adventures.
Why did the chicken cross the road? To get to the other side! Knock knock. Who's there? Lettuce.
Scientists have discovered a new species of frog in the rainforest. The frog is bright green and
only two centimetres long. Researchers believe there may be many more species waiting to be found.
The meeting is scheduled for Monday at 10:30 AM. Please bring your notes and the quarterly report.
Dear customer, your order has shipped and should arrive within three to five business days.
Water boils at 100 degrees Celsius at sea level. Ice melts at 0 degrees. The Earth orbits the Sun
once every 365.25 days, and the Moon orbits the Earth roughly once every 27 days.
Shakespeare wrote many plays, including Hamlet, Macbeth, Othello and Romeo and Juliet.
Music, art, history, science, mathematics, geography, literature and sport are all school subjects.
She said: "I can't believe it's already Friday!" He replied, "Time flies when you're having fun."
Questions? Answers. Yes, no, maybe. Always, never, sometimes, often, rarely, usually.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March, April, May,
June, July, August, September, October, November, December. Spring, summer, autumn, winter.
Red, orange, yellow, green, blue, indigo, violet, black, white, grey, brown, pink and purple.
Dogs, cats, horses, cows, sheep, pigs, birds, fish, lions, tigers, bears, elephants and monkeys.
The assistant should be honest, harmless and helpful. It should refuse dangerous requests politely.
I'm sorry, but I can't help with that. However, I can suggest some safer alternatives.
Summarise the following article in one sentence. The article describes how a small town rebuilt its
library after a flood, with volunteers donating books, time and money over several months.
Translate to French: good morning -> bonjour; thank you -> merci; goodbye -> au revoir.
Café, naïve, résumé, über, señor, 日本, 中文, Ελληνικά, русский, emoji 😀 🎉.
Paragraphs are separated by blank lines.

Tabs	and  double  spaces   also occur in real text, as do URLs like https://example.com/path?q=1.
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the BPE on ``CORPUS`` and wrap it as a ``PreTrainedTokenizerFast``."""
    tok = Tokenizer(models.BPE())
    # Digits split individually (as SmolLM2's "smollm" pre-tokenizer does), then GPT-2 byte-level.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no UNK ever
        show_progress=False,
    )
    # Repeating the corpus does not change the merges, only counts; one pass is enough.
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def main(argv: list[str]) -> None:
    """Build and save the tokenizer to the package asset folder (or ``argv[0]``)."""
    root = Path(__file__).resolve().parents[1]
    out = Path(argv[0]) if argv else root / "src" / "preftune" / "assets" / "tiny_tokenizer"
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(out))
    print(f"saved tokenizer with {len(tokenizer)} tokens to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
