"""Language model: remove attention heads or drop blocks, then recover.

The zoo's byte-level transformer (pretrained on the Python standard
library's own source files on first use) loses a fraction of its attention
heads, whole blocks, or 10 % of its weights; each damaged model is then
fine-tuned on the training text with removed structure kept removed, or
restored from its checkpoint. Perplexity is reported for every stage, next
to that of a unigram model of the same text.

    python experiments/lm_heads.py --out runs/lm_heads [--small]

``--small`` uses a 2-block, width-32 model on 32-byte windows (about a
minute on 2 CPU cores); the default model is 4 blocks of width 128.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import recovjax
from recovjax import checkpoints, language
from recovjax.damage import get_damage
from recovjax.data import text
from recovjax.recovery import make_finetune, restore_entries

SMALL = language.LMRecipe(depth=2, dim=32, num_heads=4, mlp_dim=64,
                          sequence_length=32, epochs=3, batch_size=32,
                          max_file_bytes=4096)
DAMAGES = {"remove_heads": [0.25, 0.5, 0.75], "drop_blocks": [0.25, 0.5],
           "zero": [0.1, 0.3]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    recipe = SMALL if args.small else language.LMRecipe()
    model, path = language.load_pretrained_lm(seed=0, recipe=recipe)
    corpus = text.load_text(sequence_length=recipe.sequence_length,
                            max_file_bytes=recipe.max_file_bytes)
    test = text.batch_tokens(corpus.test, 64)
    train = {"tokens": jnp.asarray(corpus.train.tokens),
             "mask": jnp.asarray(corpus.train.mask)}
    args.out.mkdir(parents=True, exist_ok=True)

    sweep = recovjax.sweep(model, model.params, damages=list(DAMAGES),
                           ratios=sorted({r for v in DAMAGES.values()
                                          for r in v}),
                           seeds=args.seeds, data=test, root_key=0)
    sweep.table.to_csv(args.out / "damage.csv")

    recover = jax.jit(make_finetune(model.forward, optax.adam(5e-4),
                                    steps=args.steps, batch_size=32,
                                    task=model.task,
                                    eval_every=max(1, args.steps // 4)))
    lines = ["| damage | ratio | damaged | fine-tuned | restored |",
             "|---|---|---|---|---|"]
    for name, ratios in DAMAGES.items():
        op = get_damage(name)
        for ratio in ratios:
            damage = op(jax.random.key(1), model.params, ratio,
                        info=model.info)
            frozen = damage.mask if name != "zero" else None
            tuned = recover(jax.random.key(2), damage.params, damage.mask,
                            train, None, jnp.ones(train["tokens"].shape[0]),
                            test, frozen)
            restored = restore_entries(path, damage.params, damage.mask)
            perplexity = [float(np.exp(tuned.curve.loss[0])),
                          float(np.exp(tuned.curve.loss[-1])),
                          language.test_metrics(
                              model.with_params(restored.params),
                              corpus)["perplexity"]]
            lines.append(f"| {name} | {ratio} | "
                         + " | ".join(f"{p:.2f}" for p in perplexity) + " |")
    metadata = checkpoints.read_metadata(path)
    report = "\n".join([
        "# Language model: damage and recovery (test perplexity)", "",
        f"pretrained: {metadata['test']['perplexity']:.2f}; unigram model "
        f"of the training text: {metadata['unigram_perplexity']:.2f}", "",
        *lines, ""])
    (args.out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
