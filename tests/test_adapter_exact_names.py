"""peft's target matching (peft.tuners.tuners_utils.check_target_module_exists): a target_modules entry that is a
module's full name selects it whatever layers_to_transform says; only suffix matches are filtered by layer."""
import pytest
import torch

import model as M
from test_adapters import _ids, _peft_adapter

pytest.importorskip("peft")


def test_full_module_name_ignores_layers_to_transform(llama_dir, tmp_path):
    folder, ref = _peft_adapter(llama_dir, str(tmp_path / "a"), r=4, lora_alpha=8,
                                target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    model, tok = M.load_model(llama_dir)
    with torch.no_grad():
        names = M.load_adapter(model, folder)
        assert sorted(names) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
        assert (model(_ids(tok)) - ref).abs().max() < 1e-4
