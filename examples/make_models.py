"""Write the tiny checkpoints the example specs merge (committed, so specs run from a fresh clone).

    python examples/make_models.py       # rewrites examples/models/{base,ft_a,ft_b,ft_c}
"""

from pathlib import Path

from weightspace.zoo.tiny import write_tiny_llama

HERE = Path(__file__).parent / "models"

if __name__ == "__main__":
    write_tiny_llama(HERE / "base", seed=0, layers=4)
    for k, name in enumerate(["ft_a", "ft_b", "ft_c"], start=1):
        write_tiny_llama(HERE / name, seed=0, delta_seed=k, layers=4)
    print(f"wrote {HERE}/base, ft_a, ft_b, ft_c")
