"""README.md's python snippets run as written, at world 2 (so they cannot rot): the quick start under
"Use it", and the three ways in, packed sequences and the training step of "Use it in your model"."""

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


def test_section_has_the_three_ways_in_packing_and_a_training_step():
    blocks = snippets()
    assert len(blocks) == 5, f"expected 5 python snippets, found {len(blocks)}"
    assert "from_dense" in blocks[0] and "odysseus.parallelize(" in blocks[1] and "parallelize_llama" in blocks[2]
    assert any("position_ids=" in b for b in blocks[3:]), "no packed-sequence snippet"
    assert any("clip_grad_norm_" in b and "torch.autocast" in b for b in blocks[3:]), "no training-step snippet"


def _run(rank, world, source, index, workdir):
    os.chdir(workdir)  # the snippets write relative paths
    exec(compile(source, f"README.md snippet {index}", "exec"), {"__name__": f"readme_snippet_{index}"})
    return True


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_readme_snippet_runs_at_world_2(index, tmp_path):
    source = snippets()[index]
    assert all(run_ranks(2, _run, source, index, str(tmp_path)))
    if "save_pretrained" in source:
        model = LlamaForCausalLM.from_pretrained(tmp_path / "llama-checkpoint")
        assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("world", [1, 2, 3])
def test_quick_start_runs(world, tmp_path):
    (source,) = snippets("## Use it")
    assert all(run_ranks(world, _run, source, "quick start", str(tmp_path)))
