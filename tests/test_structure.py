import pytest

from weightspace.structure import depth_t, is_pre_stack, is_pre_weight, parse_layer, structure_of

CASES = [
    # Llama / Mistral / Qwen
    ("model.layers.7.mlp.up_proj.weight", ("model.layers", 7, "mlp.up_proj.weight")),
    ("model.layers.31.self_attn.q_proj.weight", ("model.layers", 31, "self_attn.q_proj.weight")),
    ("model.layers.3.mlp.experts.5.w1.weight", ("model.layers", 3, "mlp.experts.5.w1.weight")),
    # BERT (bare and with the task-model prefix)
    ("encoder.layer.3.attention.self.query.weight", ("encoder.layer", 3, "attention.self.query.weight")),
    ("bert.encoder.layer.11.output.dense.bias", ("bert.encoder.layer", 11, "output.dense.bias")),
    # GPT-2
    ("h.11.attn.c_attn.weight", ("h", 11, "attn.c_attn.weight")),
    ("transformer.h.0.ln_1.weight", ("transformer.h", 0, "ln_1.weight")),
    # ViT / timm
    ("blocks.2.fc1.weight", ("blocks", 2, "fc1.weight")),
    ("visual.blocks.10.attn.qkv.weight", ("visual.blocks", 10, "attn.qkv.weight")),
    # not layers
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
    ("embeddings.word_embeddings.weight", None),
    ("wte.weight", None),
    ("model.norm.weight", None),
    ("head.bias", None),
]


@pytest.mark.parametrize("name,expected", CASES)
def test_parse_layer(name, expected):
    ln = parse_layer(name)
    if expected is None:
        assert ln is None
    else:
        assert (ln.prefix, ln.index, ln.suffix) == expected
        assert ln.with_index(ln.index) == name
        assert ln.with_index(0).startswith(ln.prefix + ".0")


@pytest.mark.parametrize(
    "name,pre",
    [("model.embed_tokens.weight", True), ("wte.weight", True), ("wpe.weight", True),
     ("embeddings.position_embeddings.weight", True), ("patch_embed.proj.weight", True),
     ("cls_token", True), ("lm_head.weight", False), ("model.norm.weight", False),
     ("pooler.dense.weight", False), ("model.layers.0.mlp.up_proj.weight", False)],
)
def test_pre_weights(name, pre):
    assert is_pre_weight(name) is pre


@pytest.mark.parametrize(
    "name,pre_stack,pre_weight",
    [("stem.weight", True, False), ("stem.0.bias", True, False),    # a top-level stem: before the stack
     ("model.embed_tokens.weight", True, True), ("patch_embed.proj.weight", True, True),
     ("backbone.stem.weight", False, False),                          # only a top-level stem counts
     ("stemmed.weight", False, False), ("blocks.0.stem.weight", False, False),
     ("head.weight", False, False), ("norm.weight", False, False)],
)
def test_pre_stack_adds_a_top_level_stem_to_the_pre_weights(name, pre_stack, pre_weight):
    assert is_pre_stack(name) is pre_stack
    assert is_pre_weight(name) is pre_weight  # gradient parameters still place a stem at t = 1


def test_structure_and_depth():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + [
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    st = structure_of(names)
    assert st.stacks == {"model.layers": 5}
    assert st.num_layers == 5 and st.main_prefix == "model.layers"
    assert set(st.non_layer) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    # layer i of n -> i / (n - 1); every tensor outside the stack at 0, as mergekit 0.1.5's
    # planner (its ConfigReader for pre and post weights keeps t = 0)
    assert [depth_t(f"model.layers.{i}.mlp.up_proj.weight", st) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert depth_t("model.embed_tokens.weight", st) == 0.0
    assert depth_t("model.norm.weight", st) == 0.0
    assert depth_t("lm_head.weight", st) == 0.0


def test_two_stacks():
    st = structure_of(["encoder.block.0.x", "encoder.block.1.x", "decoder.block.0.x"])
    assert st.stacks == {"encoder.block": 2, "decoder.block": 1}
    assert st.num_layers == 2
