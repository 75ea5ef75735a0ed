"""The public sampling/conditioning spec: one object for what sample, run and eval draw."""

from __future__ import annotations

import pytest

from qdiff.core.errors import SamplingError
from qdiff.runtime.sampling_spec import SamplingSpec


def test_keywords_and_spec_give_the_same_plan(class_cond_model_dir):
    from qdiff.evaluate import sampling_plan
    from qdiff.models import load_model

    bundle = load_model(class_cond_model_dir)
    spec = SamplingSpec(steps=7, num_images=3, seed=5, guidance_scale=2.0, class_labels=(0, 2, 1))
    a = sampling_plan(bundle, spec)
    b = sampling_plan(bundle, steps=7, num_images=3, seed=5, guidance_scale=2.0, class_labels=[0, 2, 1])
    assert a.seeds == b.seeds == (5, 6, 7) and a.steps == 7 and a.guidance_scale == 2.0
    assert a.conditioning.source == b.conditioning.source
    assert (a.conditioning.cond["encoder_hidden_states"] == b.conditioning.cond["encoder_hidden_states"]).all()


def test_misspelt_keyword_and_both_forms_are_refused():
    with pytest.raises(SamplingError, match="unknown sampling setting.*num_image") as err:
        SamplingSpec.of(num_image=4)
    assert "num_images" in str(err.value)  # the hint lists the known settings
    with pytest.raises(SamplingError, match="not both"):
        SamplingSpec.of(SamplingSpec(), steps=3)
    with pytest.raises(SamplingError, match="at least 1 image"):
        SamplingSpec(num_images=0)
    spec = SamplingSpec.of(prompts=["a", "b"], embeddings=None, steps=None)
    assert spec.prompts == ("a", "b") and spec.steps == 50  # None means "the default"
    assert SamplingSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.to_json().items()}) == spec


def test_default_valued_keywords_do_not_clash_with_a_spec():
    spec = SamplingSpec(steps=9)
    assert SamplingSpec.of(spec, random_conditioning=False, guidance_scale=3.0) is spec
    with pytest.raises(SamplingError, match="not both.*steps"):
        SamplingSpec.of(spec, steps=10)

