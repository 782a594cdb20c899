"""Prompt files, per-image seeds, batches and shards: pure Python, no model."""

import json

import pytest

from diffkern.distributed import make_batches, make_jobs, read_prompts, shard


def test_txt_one_prompt_per_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \n{\"prompt\": \"literal\"}\n")
    specs = read_prompts(path)
    assert [s["prompt"] for s in specs] == ["a cat", "a dog", '{"prompt": "literal"}']  # txt is never JSON
    assert [s["line"] for s in specs] == [1, 3, 4]


def test_jsonl_keys_size_and_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "a", "seed": 7, "steps": 3, "guidance": 2.5, "negative_prompt": "b"},
             {"prompt": "c", "size": [16, 24]}, "plain string", {"prompt": "d", "size": 8}]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    specs = read_prompts(path)
    assert specs[0] == dict(lines[0], line=1)
    assert (specs[1]["height"], specs[1]["width"]) == (16, 24) and "size" not in specs[1]
    assert specs[2] == {"prompt": "plain string", "line": 3}
    assert (specs[3]["height"], specs[3]["width"]) == (8, 8)
    for bad, needle in [({"prompt": "a", "sede": 1}, "unknown key(s) sede"), ({"seed": 1}, "needs \"prompt\""),
                        ({"prompt": "a", "steps": True}, "\"steps\" has the wrong type"),
                        ({"prompt": "a", "height": -8}, "must be positive"), ([1, 2], "expected a JSON object")]:
            path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(bad) + "\n")
            with pytest.raises(ValueError, match=f"p.jsonl:2: .*{needle}".replace("(", r"\(").replace(")", r"\)")):
                read_prompts(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="p.jsonl:1: not valid JSON"):
        read_prompts(path)
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.txt")


def test_seeds_follow_the_image_index_and_line_seeds():
    specs = [{"prompt": "a"}, {"prompt": "b", "seed": 100}, {"prompt": "c"}]
    jobs = make_jobs(specs, seed=10, num_images=2, defaults={"steps": 5, "guidance": 1.5})
    assert [(j.index, j.prompt, j.seed) for j in jobs] == [
        (0, "a", 10), (1, "a", 11), (2, "b", 100), (3, "b", 101), (4, "c", 14), (5, "c", 15)]
    assert all(j.settings == {"steps": 5, "guidance": 1.5, "height": None, "width": None} for j in jobs)
    with pytest.raises(ValueError, match="prompt line 2: this model does not take per-prompt height"):
        make_jobs([{"prompt": "a"}, {"prompt": "b", "height": 8, "line": 2}], accepts=("steps", "guidance"))


def test_batches_group_equal_settings_and_do_not_depend_on_the_world_size():
    specs = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c", "steps": 9}, {"prompt": "d"}, {"prompt": "e"},
             {"prompt": "f"}]
    jobs = make_jobs(specs, defaults={"steps": 2, "guidance": 3.0})
    batches = make_batches(list(reversed(jobs)), batch_size=2)  # order of the input does not matter
    assert [[j.index for j in b] for b in batches] == [[0, 1], [2], [3, 4], [5]]
    dealt = [shard(batches, r, 3) for r in range(3)]
    assert [[b[0].index for b in d] for d in dealt] == [[0, 5], [2], [3]]
    assert sorted(j.index for d in dealt for b in d for j in b) == list(range(6))
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(jobs, 0)
    with pytest.raises(ValueError, match="rank"):
        shard(batches, 3, 3)
