"""First-start registration of the demo SAE, labels and variants: idempotent, through the Registry."""

from __future__ import annotations

from steerserve.demo.shipped import DEMO_LATE_SAE_ID, DEMO_SAE_ID, read_json, register_demo
from steerserve.registry import Registry
from steerserve.runner.model_adapter import model_adapter


def test_register_twice_stores_once_and_restores_what_was_deleted(demo_lm, tmp_path):
    model, tokenizer = demo_lm
    info = model_adapter(model).info(tokenizer, "demo", 256)
    registry = Registry(tmp_path / "data")
    try:
        register_demo(registry, info)
        sae = registry.get_sae(DEMO_SAE_ID)
        labelled = registry.count_features(DEMO_SAE_ID)
        variants = {v.id for v in registry.list_variants()}
        assert labelled == sae.d_sae and variants == {v["id"] for v in read_json("variants.json")}
        assert registry.count_features(DEMO_LATE_SAE_ID) == registry.get_sae(DEMO_LATE_SAE_ID).d_sae

        registry.delete_variant("cold")
        register_demo(registry, info)
        assert registry.get_sae(DEMO_SAE_ID).uid == sae.uid  # not stored again
        assert len(registry.list_saes()) == 2 and registry.count_features(DEMO_SAE_ID) == labelled
        assert {v.id for v in registry.list_variants()} == variants
    finally:
        registry.close()
