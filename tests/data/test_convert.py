"""CoIN and UCIT converters on tiny trees written in the released files' shapes: the manifest loads
with cram_ray's loader, each task gets its metric and its records, reference lists are joined, bad
records end the program with one line and exit 2, and `prepare_data.py --from` produces shards."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from data_testutil import png

from cram_ray.data.convert import COIN, UCIT, convert
from cram_ray.data.manifest import load_benchmark
from cram_ray.data.records import DataError
from cram_ray.data.shards import read_shards
from cram_ray.eval.scorers import score

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("prepare_data_script", ROOT / "workflows" / "prepare_data.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

COIN_METRICS = {"ScienceQA": "option_letter", "TextVQA": "vqa", "ImageNet": "contains", "GQA": "lower_exact",
                "VizWiz": "lower_exact", "Grounding": "iou", "VQAv2": "lower_exact", "OCRVQA": "lower_exact"}
UCIT_METRICS = {"ImageNet-R": "lower_exact", "ArxivQA": "lower_exact", "VizWiz-Caption": "anls",
                "IconQA": "lower_exact", "CLEVR-Math": "lower_exact", "Flickr30k": "anls"}
TEXTVQA_HUMANS = ["stop"] * 7 + ["stop sign"] * 3


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _llava(rid, image, question, answer) -> dict:
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                         {"from": "gpt", "value": answer}]}


def _question(qid, image, text, **answer) -> dict:
    return {"question_id": qid, "image": image, "text": text, **answer}


def _test_answer(task: str, k: int) -> dict:
    if task == "ScienceQA":
        return {"answer": "AB"[k % 2]}
    if task == "Grounding":
        return {"answer_bbox": f"[0.{k + 1}, 0.1, 0.8, 0.9]", "size": [640, 480]}
    return {"answer": f"{task.lower()}-{k}"}


def coin_tree(src: Path) -> Path:
    """A CoIN download: Instructions_Original/<Task>/{train,test|val}.json, images under cl_dataset/."""
    test_names = {"TextVQA": "val.json", "VizWiz": "val.json", "VQAv2": "val.json"}
    for t, spec in enumerate(COIN.tasks):
        task = spec.name
        img = f"{task}/images/{task.lower()}_{{}}.png"
        for k in range(3):
            (src / "cl_dataset" / img.format(k)).parent.mkdir(parents=True, exist_ok=True)
            (src / "cl_dataset" / img.format(k)).write_bytes(png((8, 8), (30 * t, 20 * k, 90)))
        # LLaVA train files reuse an image's id for each of its questions
        train = [_llava(f"{task}-img0", img.format(0), f"{task} question 0?", f"{task} answer 0"),
                 _llava(f"{task}-img0", img.format(0), f"{task} question 1?", f"{task} answer 1"),
                 _llava(f"{task}-img1", img.format(1), f"{task} question 2?", f"{task} answer 2")]
        test = [_question(100 * t + k, img.format(2), f"{task} test {k}?\nAnswer briefly.", **_test_answer(task, k))
                for k in range(2)]
        _write(src / "Instructions_Original" / task / "train.json", train)
        _write(src / "Instructions_Original" / task / test_names.get(task, "test.json"), test)
    # TextVQA's human answers live in its own annotation file (CoIN's TextVQA evaluation reads it)
    _write(src / "cl_dataset" / "TextVQA" / "TextVQA_0.5.1_val.json",
           {"data": [{"question_id": 100 + k, "answers": TEXTVQA_HUMANS} for k in range(2)] +
                    [{"question_id": 999, "answers": ["other"]}]})
    return src


def ucit_tree(src: Path, mcitlib: bool = False) -> Path:
    """A UCIT download as HiDe-LLaVA documents it: instructions/<Task>/..., datasets/<Task>/...;
    ``mcitlib``: as MCITlib lays it out, task folders in the root with train.json / test.json and
    no caption annotations."""
    folders = {"ImageNet-R": ("ImageNet-R", "train.json"), "ArxivQA": ("ArxivQA", "train_4w.json"),
               "VizWiz-Caption": ("VizWiz", "train.json"), "IconQA": ("IconQA", "train.json"),
               "CLEVR-Math": ("CLEVR", "train_4w.json"), "Flickr30k": ("Flickr30k", "train_brief_4w.json")}
    if mcitlib:
        folders = {name: (name if name != "VizWiz-Caption" else "VizWiz", "train.json") for name in folders}
    inst = src if mcitlib else src / "instructions"
    for t, spec in enumerate(UCIT.tasks):
        folder, train_name = folders[spec.name]
        img = f"{folder}/train/{t}_{{}}.png"
        for k in range(3):
            (src / "datasets" / img.format(k)).parent.mkdir(parents=True, exist_ok=True)
            (src / "datasets" / img.format(k)).write_bytes(png((8, 8), (40 * t, 30 * k, 10)))
        train = [_llava(f"u{t}-{k}", img.format(k), f"{spec.name} q{k}?", f"{spec.name} a{k}") for k in range(3)]
        test = [_question(f"u{t}-t{k}", img.format(k), f"{spec.name} test {k}?", answer=f"{spec.name} b{k}")
                for k in range(2)]
        _write(inst / folder / train_name, train)
        _write(inst / folder / ("test.json" if mcitlib else "test_3000.json"), test)
        if spec.metric == "anls" and not mcitlib:  # COCO-style reference captions, image_id = test position
            _write(inst / folder / "val_coco_type_3000.json",
                   {"images": [{"id": k + 1} for k in range(2)],
                    "annotations": [{"image_id": k + 1, "id": 10 * k + j, "caption": f"caption {k} by {j}"}
                                    for k in range(2) for j in range(5)]})
    return src


@pytest.fixture
def coin_src(tmp_path) -> Path:
    return coin_tree(tmp_path / "CoIN")


def test_coin_converts_to_a_manifest_the_loader_reads(coin_src, tmp_path):
    conv = convert("coin", coin_src, tmp_path / "bench")
    bench = load_benchmark(conv.manifest)  # images decoded too
    assert bench.name == "coin" and {t.name: t.metric for t in bench.tasks} == COIN_METRICS
    assert bench.task_names == list(COIN_METRICS)  # the benchmark's order
    assert bench.image_root == (coin_src / "cl_dataset").resolve()
    for task, report in zip(bench.tasks, conv.tasks):
        assert (len(task.entries("train")), len(task.entries("test"))) == (report.train, report.test) == (3, 2)
        assert report.renamed == 1 and report.skipped == 0
        assert [e.id for e in task.entries("train")] == [f"{task.name}-img0", f"{task.name}-img0-2", f"{task.name}-img1"]
        assert [e.answer for e in task.entries("train")] == [f"{task.name} answer {k}" for k in range(3)]
    sqa, textvqa, grounding = bench.task("ScienceQA"), bench.task("TextVQA"), bench.task("Grounding")
    assert [e.answer for e in sqa.entries("test")] == ["A", "B"]
    assert sqa.entries("test")[0].instruction == "ScienceQA test 0?\nAnswer briefly."
    assert [e.id for e in textvqa.entries("test")] == ["100", "101"]
    assert all(e.answers == tuple(TEXTVQA_HUMANS) for e in textvqa.entries("test"))
    assert [r.with_references for r in conv.tasks] == [0, 2, 0, 0, 0, 0, 0, 0]
    assert conv.tasks[1].sources["references"] == "cl_dataset/TextVQA/TextVQA_0.5.1_val.json"
    assert [e.answer for e in grounding.entries("test")] == ["[0.1, 0.1, 0.8, 0.9]", "[0.2, 0.1, 0.8, 0.9]"]
    assert all(e.answers is None for t in bench.tasks if t.name != "TextVQA" for e in t.entries("test"))


def test_ucit_converts_with_caption_references_joined_by_position(tmp_path):
    src = ucit_tree(tmp_path / "UCIT")
    conv = convert("ucit", src, tmp_path / "bench")
    bench = load_benchmark(conv.manifest)
    assert bench.task_names == list(UCIT_METRICS) and {t.name: t.metric for t in bench.tasks} == UCIT_METRICS
    assert [(r.train, r.test, r.renamed) for r in conv.tasks] == [(3, 2, 0)] * 6
    assert conv.tasks[1].sources == {"train": "instructions/ArxivQA/train_4w.json",
                                     "test": "instructions/ArxivQA/test_3000.json"}
    flickr = bench.task("Flickr30k")
    assert [e.answer for e in flickr.entries("test")] == ["Flickr30k b0", "Flickr30k b1"]
    assert [e.answers for e in flickr.entries("test")] == [tuple(f"caption {k} by {j}" for j in range(5))
                                                           for k in range(2)]
    assert [r.with_references for r in conv.tasks] == [0, 0, 2, 0, 0, 2]


def test_ucit_as_mcitlib_lays_it_out_converts_without_caption_references(tmp_path):
    conv = convert("ucit", ucit_tree(tmp_path / "UCIT", mcitlib=True), tmp_path / "bench")
    assert load_benchmark(conv.manifest).task_names == list(UCIT_METRICS)
    assert conv.tasks[4].sources == {"train": "CLEVR-Math/train.json", "test": "CLEVR-Math/test.json"}
    assert [r.with_references for r in conv.tasks] == [0] * 6  # scored against the single answer


def test_folders_with_other_names_are_given_relative_to_the_source(coin_src, tmp_path, capsys):
    (coin_src / "Instructions_Original").rename(coin_src / "instr")
    (coin_src / "cl_dataset").rename(coin_src / "imgs")
    conv = convert("coin", coin_src, tmp_path / "bench", instructions="instr", images="imgs")
    assert load_benchmark(conv.manifest).image_root == (coin_src / "imgs").resolve()
    (tmp_path / "elsewhere" / "ScienceQA").mkdir(parents=True)
    assert _main("--from", "coin", str(coin_src), "--out", str(tmp_path / "out"), "--instructions", "../elsewhere",
                 "--images", "imgs") == 2
    assert "outside the source folder" in _one_error_line(capsys)


@pytest.mark.parametrize("layout,tree", [("coin", coin_tree), ("ucit", ucit_tree)])
def test_the_example_manifests_are_what_the_converter_writes(layout, tree, tmp_path):
    conv = convert(layout, tree(tmp_path / "src"), tmp_path / "bench")
    written = yaml.safe_load(conv.manifest.read_text())
    example = yaml.safe_load((ROOT / "workflows" / "benchmarks" / f"{layout}.yaml").read_text())
    assert {**written, "image_root": None} == {**example, "image_root": None}
    assert written["image_root"] == f"../src/{'cl_dataset' if layout == 'coin' else 'datasets'}"


def _main(*args: str) -> int:
    return script.main([*args])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("edit,expected", [
    (lambda recs: recs[1].pop("answer"), "test.json: record '101' (#1) field 'answer': expected a non-empty answer"),
    (lambda recs: recs[0].update(image="../../outside.png"), "record '100' (#0) field 'image': ../../outside.png "
                                                             "resolves to"),
    (lambda recs: recs[1].update(answer="the sky"), "record '101' (#1): answer 'the sky' is not an option letter"),
    (lambda recs: recs.append({"question_id": 7}), "record '7' (#2): expected 'conversations'"),
])
def test_a_record_that_cannot_be_mapped_exits_2_with_one_line(coin_src, tmp_path, capsys, edit, expected):
    task = "ScienceQA" if "option letter" in expected else "GQA"
    path = coin_src / "Instructions_Original" / task / "test.json"
    recs = json.loads(path.read_text())
    for r in recs:
        r["question_id"] = 100 + recs.index(r)
    edit(recs)
    path.write_text(json.dumps(recs))
    out = tmp_path / "out"
    assert _main("--from", "coin", str(coin_src), "--out", str(out)) == 2
    err = _one_error_line(capsys)
    assert str(path) in err and expected in err
    assert not out.exists()


def test_nothing_outside_the_source_is_read(coin_src, tmp_path, capsys):
    secret = tmp_path / "secret.json"
    secret.write_text("[]")
    train = coin_src / "Instructions_Original" / "OCRVQA" / "train.json"
    train.unlink()
    train.symlink_to(secret)
    assert _main("--from", "coin", str(coin_src), "--out", str(tmp_path / "out")) == 2
    assert f"resolves to {secret}, outside the source folder" in _one_error_line(capsys)


def test_missing_images_fail_or_are_skipped_and_counted(coin_src, tmp_path, capsys):
    (coin_src / "cl_dataset" / "VizWiz" / "images" / "vizwiz_1.png").unlink()
    assert _main("--from", "coin", str(coin_src), "--out", str(tmp_path / "a"), "--convert-only") == 2
    assert "record 'VizWiz-img1' (#2) field 'image': image file" in _one_error_line(capsys)
    conv = convert("coin", coin_src, tmp_path / "b", skip_missing_images=True)
    vizwiz = next(r for r in conv.tasks if r.name == "VizWiz")
    assert (vizwiz.train, vizwiz.skipped) == (2, 1)
    assert len(load_benchmark(conv.manifest).task("VizWiz").entries("train")) == 2


def test_a_rerun_reuses_the_same_conversion_and_refuses_other_content(coin_src, tmp_path):
    first = convert("coin", coin_src, tmp_path / "bench")
    before = {p: p.read_bytes() for p in (tmp_path / "bench").rglob("*") if p.is_file()}
    assert convert("coin", coin_src, tmp_path / "bench").reused and not first.reused
    _write(coin_src / "Instructions_Original" / "GQA" / "test.json",
           [_question(1, "GQA/images/gqa_2.png", "changed?", answer="yes")])
    with pytest.raises(DataError, match="holds something other than this conversion"):
        convert("coin", coin_src, tmp_path / "bench")
    assert {p: p.read_bytes() for p in (tmp_path / "bench").rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_prepare_data_from_coin_writes_shards_with_the_reference_lists(coin_src, tmp_path, capsys):
    out = tmp_path / "out"
    assert _main("--from", "coin", str(coin_src), "--out", str(out), "--cache-dir", str(tmp_path / "cache")) == 0
    printed = capsys.readouterr().out
    assert "TextVQA: 3 train, 2 test records, metric vqa (0 skipped, 1 repeated ids renamed, 2 with reference lists)" \
        in printed
    marker = json.loads((out / "shards" / "_DONE.json").read_text())
    assert [(t["name"], t["metric"], t["train"], t["test"]) for t in marker["tasks"]] == \
        [(name, metric, 3, 2) for name, metric in COIN_METRICS.items()]
    textvqa = read_shards(out / "shards" / "TextVQA" / "test")
    assert textvqa == load_benchmark(out / "benchmark" / "coin.yaml").task("TextVQA").records("test")
    # the VQA accuracy over the human answers, not a match of the single training answer
    assert score(textvqa[0].metric, "stop sign", textvqa[0].reference) == pytest.approx(0.9)
    assert score(textvqa[0].metric, "stop sign", textvqa[0].answer) == 0.0


def test_the_7b_preset_plans_a_converted_benchmark(coin_src, tmp_path, capsys):
    conv = convert("coin", coin_src, tmp_path / "bench")
    stream = importlib.util.spec_from_file_location("stream_script", ROOT / "workflows" / "stream.py")
    module = importlib.util.module_from_spec(stream)
    stream.loader.exec_module(module)
    assert module.main(["--config", str(ROOT / "workflows" / "configs" / "llava-1.5-7b-coin.yaml"),
                        "--benchmark", str(conv.manifest), "--dry-run", "--set", f"storage={tmp_path / 'store'}"]) == 0
    plan = capsys.readouterr().out
    assert f"tasks: 8 ({', '.join(COIN_METRICS)})" in plan and "plan: ok" in plan


def test_a_source_without_the_layout_names_what_it_looked_for(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _main("--from", "coin", str(tmp_path / "empty"), "--out", str(tmp_path / "out")) == 2
    assert "no CoIN instruction folder (looked for Instructions_Original" in _one_error_line(capsys)
    assert _main("--from", "vqa", str(tmp_path / "empty"), "--out", str(tmp_path / "out")) == 2
    assert "unknown layout 'vqa' (expected one of coin, ucit)" in _one_error_line(capsys)


def test_reference_lists_survive_ray_datas_batches():
    """The Ray Data evaluation turns shard rows back into records from numpy batches."""
    from ray.data.block import BlockAccessor

    from cram_ray.data.records import Record
    from cram_ray.data.shards import records_table
    from cram_ray.train.ingest import records_of

    recs = [Record("a", "TextVQA", None, "q?", "stop", "vqa", tuple(TEXTVQA_HUMANS)),
            Record("b", "GQA", None, "q?", "left", "lower_exact")]
    assert records_of(BlockAccessor.for_block(records_table(recs)).to_batch_format("numpy")) == recs
