"""The compatibility matrix: every pair of features is proven by a test against a reference
(tests/combinations.py) or refused at config time with one line naming both keys, and the README's
table is the generated one."""

import itertools
from pathlib import Path

import pytest
from combinations import all_pairs, matrix_markdown, proofs, proven

from expertmesh import config
from expertmesh.config import ConfigError

README = Path(__file__).resolve().parents[2] / "README.md"

# a config that turns each feature on (under world size 4 where it matters)
TURN_ON = {"ep": ["parallel.ep=2"], "tp": ["parallel.tp=2"], "pp": ["parallel.pp=2"], "fsdp": ["parallel.ep=2"],
           "fssdp": ["parallel.ep=2", 'moe.placement="fssdp"', "moe.fssdp.reshard_every=0"],
           "diloco": ["diloco.enabled=true"], "topk": ["diloco.enabled=true", 'diloco.compress="topk"'],
           "ac": ['parallel.activation_checkpoint="full"'], "capacity": ["moe.capacity_factor=1.0"],
           "bias": ["moe.bias_update_rate=0.01"], "pr-moe": ["moe.residual=true"], "shared": ["moe.shared_experts=1"],
           "accum": ["train.grad_accum=2"], "bf16": ['train.mixed_precision="bf16"'], "compile": ["train.compile=true"],
           "draft_head": ["draft_head.enabled=true"], "triton": ['moe.backend="triton"']}


def test_every_pair_is_proven_or_refused_and_never_both():
    done = proven()
    missing = [sorted(p) for p in all_pairs() if p not in done and p not in config.REFUSED]
    assert not missing, f"pairs neither tested against a reference nor refused: {missing}"
    assert not [sorted(p) for p in config.REFUSED if p in done]  # a refused pair has no passing test
    assert set(TURN_ON) == set(config.FEATURES)


def test_each_proof_turns_its_features_on():
    """A proof's config has on what it claims: its compared features are on in the run."""
    for p in proofs():
        on, tested = p.features()
        assert tested and tested <= on, p.where


@pytest.mark.parametrize("a, b", [sorted(p, key=list(config.FEATURES).index) for p in config.REFUSED])
def test_a_refused_pair_is_one_line_naming_both_keys(a, b):
    with pytest.raises(ConfigError) as err:
        config.load(None, TURN_ON[a] + TURN_ON[b])
    assert f"{config.FEATURES[a][0]} with {config.FEATURES[b][0]} is refused: " in str(err.value)
    assert "\n" not in str(err.value)


def test_supported_pairs_pass_the_config_checks():
    for a, b in itertools.combinations(config.FEATURES, 2):
        if frozenset({a, b}) not in config.REFUSED:
            cfg = config.load(None, TURN_ON[a] + TURN_ON[b])
            assert {a, b} <= config.features_of(cfg, 4), (a, b)


def test_the_readme_table_is_the_generated_one():
    assert matrix_markdown() in README.read_text(), "regenerate it: python -c 'import combinations; " \
                                                    "print(combinations.matrix_markdown())' in tests/"
