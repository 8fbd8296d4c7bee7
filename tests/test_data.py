import json

import pytest

from unike.data import FIELDS, DataError, case_samples, load_cases


def write(tmp_path, records, name="vqa_eval.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def good_record(world_dir):
    return {k: v for k, v in json.loads((world_dir / "vqa_eval.json").read_text())[0].items()}


@pytest.mark.parametrize("field,mutate,message", [
    ("alt", lambda r: r.update(alt="  "), "empty"),
    ("loc_ans", lambda r: r.pop("loc_ans"), "missing"),
    ("image", lambda r: r.update(image="images/nope.png"), "image not found"),
    ("src", lambda r: r.update(src=3), "expected a string"),
])
def test_bad_record_error_names_file_record_and_field(tmp_path, world_dir, good_record, field, mutate, message):
    bad = dict(good_record)
    mutate(bad)
    path = write(tmp_path, [good_record, bad])
    with pytest.raises(DataError) as err:
        load_cases(path, "e-vqa", world_dir)
    text = str(err.value)
    assert str(path) in text and "record 1" in text and repr(field) in text and message in text


def test_invalid_json_names_the_file(tmp_path, world_dir):
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(DataError, match="broken.json: invalid JSON"):
        load_cases(path, "e-vqa", world_dir)


def test_skip_bad_records_skips_and_logs(tmp_path, world_dir, good_record, caplog):
    bad = dict(good_record, alt="")
    path = write(tmp_path, [bad, good_record, dict(good_record, case_id="other")])
    cases = load_cases(path, "e-vqa", world_dir, skip_bad=True)
    assert [c.case_id for c in cases] == [good_record["case_id"], "other"]
    assert "skipped 1 bad records" in caplog.text and "record 0" in caplog.text


def test_real_mmedit_records_without_case_id_get_stable_ids(tmp_path, world_dir, good_record):
    plain = {k: good_record[k] for k in FIELDS}
    path = write(tmp_path, [plain, plain])
    cases = load_cases(path, "e-vqa", world_dir)
    assert [c.case_id for c in cases] == ["vqa_eval-00000", "vqa_eval-00001"]
    # Without a fact_id each case is its own fact.
    assert [c.fact_id for c in cases] == ["vqa_eval-00000", "vqa_eval-00001"]


def test_fact_id_is_read_and_checked(tmp_path, world_dir, good_record):
    plain = {k: good_record[k] for k in FIELDS}
    records = [dict(plain, case_id="a", fact_id="c017-diet"), dict(plain, case_id="b", fact_id="c017-diet"),
               dict(plain, case_id="c")]
    cases = load_cases(write(tmp_path, records), "e-vqa", world_dir)
    assert [c.fact_id for c in cases] == ["c017-diet", "c017-diet", "c"]
    for bad in ("", 17):
        with pytest.raises(DataError, match=r"record 1: field 'fact_id': expected a non-empty string"):
            load_cases(write(tmp_path, [plain, dict(plain, fact_id=bad)]), "e-vqa", world_dir)


def test_prompts_follow_easyedit_conventions(vqa_cases, caption_cases):
    rel, t_gen, m_gen, t_loc, m_loc = case_samples(vqa_cases[0])
    c = vqa_cases[0]
    assert rel.prompt == f"Question: {c.src} Short answer:" and rel.answer == c.alt and rel.image == c.image
    assert t_gen.prompt == f"Question: {c.rephrase} Short answer:" and t_gen.image == c.image
    assert m_gen.image == c.image_rephrase and m_gen.prompt == rel.prompt
    assert t_loc.image is None and t_loc.prompt == c.loc and t_loc.answer == c.loc_ans
    assert m_loc.prompt == f"Question: {c.m_loc_q} Short answer:" and m_loc.image == c.m_loc
    cap = caption_cases[0]
    rel, t_gen, _, _, m_loc = case_samples(cap)
    assert rel.prompt == cap.src and t_gen.prompt == cap.rephrase
    assert m_loc.prompt.startswith("Question: ")  # M-Loc keeps the VQA wrapping for captions too
