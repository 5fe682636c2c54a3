"""README.md's python snippets run as written (so they cannot rot): the quick start under "Use it", and the
three ways in, packed sequences, the 2-D mesh (at world 4, as 2 x 2), the training step and the long-sequence
options of "Use it in your model" (at world 2)."""

import os
import re

import pytest
from multirank import run_ranks
from transformers import LlamaForCausalLM

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SECTION = "## Use it in your model"


def snippets(section: str = SECTION) -> list[str]:
    """The fenced ``python`` blocks between the section's heading and the next ``## `` heading."""
    with open(README) as f:
        text = f.read()
    assert section + "\n" in text, f"README.md has no {section!r} section"
    body = text.split(section + "\n", 1)[1]
    body = re.split(r"^## ", body, maxsplit=1, flags=re.MULTILINE)[0]
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.MULTILINE | re.DOTALL)


def test_section_has_the_three_ways_in_packing_a_mesh_a_training_step_and_long_sequences():
    blocks = snippets()
    assert len(blocks) == 7, f"expected 7 python snippets, found {len(blocks)}"
    assert "from_dense" in blocks[0] and "odysseus.parallelize(" in blocks[1] and "parallelize_llama" in blocks[2]
    assert any("position_ids=" in b for b in blocks[3:]), "no packed-sequence snippet"
    assert any('mesh_dim_names=("dp", "sp")' in b and "zero3" in b for b in blocks[3:]), "no 2-D mesh snippet"
    assert any("clip_grad_norm_" in b and "torch.autocast" in b for b in blocks[3:]), "no training-step snippet"
    assert any("checkpoint=True" in b and "model_loss" in b for b in blocks[3:]), "no long-sequence snippet"


def _run(rank, world, source, index, workdir):
    os.chdir(workdir)  # the snippets write relative paths
    exec(compile(source, f"README.md snippet {index}", "exec"), {"__name__": f"readme_snippet_{index}"})
    return True


@pytest.mark.parametrize("index", range(7))
def test_readme_snippet_runs(index, tmp_path):
    source = snippets()[index]
    world = 4 if "init_device_mesh" in source else 2  # the 2-D mesh snippet: 2 replicas x 2
    assert all(run_ranks(world, _run, source, index, str(tmp_path)))
    if "save_pretrained" in source:
        model = LlamaForCausalLM.from_pretrained(tmp_path / "llama-checkpoint")
        assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("world", [1, 2, 3])
def test_quick_start_runs(world, tmp_path):
    (source,) = snippets("## Use it")
    assert all(run_ranks(world, _run, source, "quick start", str(tmp_path)))
