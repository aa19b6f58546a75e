"""training.report: the paper-style table from run directories with synthetic eval/bench/md JSON, '-' for
missing pieces, non-empty PNG plots, and the `hessforge report` command."""
import json

import pytest

from training.report import PLOTS, bench_numbers, collect, markdown, write_report


def timing(ns_day):
    return {"median_s": 0.1, "ns_per_day": ns_day, "structures_per_s": ns_day / 0.0864}


def bench(student_64, student_best, best_batch, teacher_64=10.0, teacher_best=20.0):
    entry = lambda name, b, ns: {"name": name, "mode": "eager", "batch_size": b, "model": timing(ns * 1.1),  # noqa
                                  "model_nl": timing(ns)}
    return {"reference": ["ani1x", "eager"], "batch_size": 64, "machine": {"cpu": "toy cpu"},
            "fixed": [entry("ani1x", 64, teacher_64), entry("best.pt", 64, student_64)],
            "sweeps": [{"name": "ani1x", "mode": "eager", "results": [entry("ani1x", 1, 1.0),
                                                                      entry("ani1x", 256, teacher_best)]},
                       {"name": "best.pt", "mode": "eager", "results": [entry("best.pt", 1, 5.0),
                                                                        entry("best.pt", best_batch, student_best)]}],
            "best": []}


def eval_json(f, e, teacher=None):
    out = {"student_vs_reference": {"forces_mae_mev_per_A": f, "energy_mae_mev_per_atom": e},
           "teacher_vs_reference": {"forces_mae_mev_per_A": 75.8, "energy_mae_mev_per_atom": 10.3},
           "n_structures": 18}
    if teacher:  # evaluate records the labels' teacher
        out["teacher"] = teacher
    return out


def md_json(ttf):
    times = [0.0, 0.25, 0.5, 0.75, 1.0]
    fraction = [sum(1 for t in ttf if t is None or t > x) / len(ttf) for x in times]
    return {"reference": "ani1x",
            "nvt": {"trajectories": [{"time_to_failure_ps": t, "survived": t is None} for t in ttf],
                    "time_ps": times, "fraction_stable": fraction,
                    "fraction_survived": sum(t is None for t in ttf) / len(ttf),
                    "mean_time_to_failure_ps_censored": sum(1.0 if t is None else t for t in ttf) / len(ttf),
                    "simulated_ps_per_trajectory": 1.0},
            "nve": {"mean_abs_drift_eV_per_atom_per_ps": 0.002, "median_abs_drift_eV_per_atom_per_ps": 0.001,
                    "n_completed": 3, "n_runs": 4},
            "opt": {"fraction_converged": 1.0, "mean_reference_fmax_eV_per_A": 0.5,
                    "median_reference_fmax_eV_per_A": 0.25, "mean_energy_above_reference_minimum_eV": 0.03,
                    "median_energy_above_reference_minimum_eV": 0.01}}


@pytest.fixture
def runs(tmp_path):
    a, b = tmp_path / "undistilled", tmp_path / "hessian_kd"
    a.mkdir()
    b.mkdir()
    (a / "eval.json").write_text(json.dumps(eval_json(25.0, 4.2)))
    (a / "bench.json").write_text(json.dumps(bench(300.0, 1800.0, 1024)))
    (a / "md.json").write_text(json.dumps(md_json([0.5, None, 0.25, None])))
    (b / "eval.json").write_text(json.dumps(eval_json(8.77, 3.1)))  # no bench.json, no md.json
    return [str(a), str(b)]


def test_bench_numbers_picks_student_teacher_and_best():
    b = bench_numbers(bench(300.0, 1800.0, 1024))
    assert b["ns_day_64"] == 300.0 and b["ns_day_best"] == 1800.0 and b["best_batch"] == 1024
    assert b["teacher"] == "ani1x" and b["teacher_ns_day_64"] == 10.0 and b["teacher_ns_day_best"] == 20.0
    # a bench without --sweep measured one batch size: no best batch to report
    fixed_only = bench_numbers(dict(bench(300.0, 1800.0, 1024), sweeps=[]))
    assert fixed_only["ns_day_64"] == 300.0 and fixed_only["ns_day_best"] is None and fixed_only["best_batch"] is None
    assert fixed_only["teacher_ns_day_64"] == 10.0 and fixed_only["teacher_ns_day_best"] is None


def test_bench_without_compare_has_no_teacher():
    """A bench of students alone (no --compare): its first model is the reference, not a teacher."""
    b = bench(300.0, 1800.0, 1024)  # as if `--modes fused,eager` without --compare: ani1x rows become fused
    for entry in b["fixed"] + [r for sw in b["sweeps"] for r in sw["results"]]:
        if entry["name"] == "ani1x":
            entry.update(name="best.pt", mode="fused")
    b.update(compare=[], reference=["best.pt", "fused"])
    numbers = bench_numbers(b)
    assert "teacher" not in numbers and numbers["student"] == "best.pt [eager]" and numbers["ns_day_64"] == 300.0
    assert bench_numbers(dict(bench(300.0, 1800.0, 1024), compare=[["ani1x", "eager"]]))["teacher"] == "ani1x"


def test_table_rows_and_missing_pieces(runs, tmp_path):
    report = collect(runs)
    text = markdown(report)
    lines = text.splitlines()
    teacher = next(l for l in lines if l.startswith("| teacher (ani1x)"))
    assert teacher == "| teacher (ani1x) | 75.80 | 10.30 | 10.0 | 20.0 (batch 256) | 1.0x | 1.0x |"
    und = next(l for l in lines if l.startswith("| undistilled | 25.00"))
    assert und == "| undistilled | 25.00 | 4.20 | 300 | 1800 (batch 1024) | 30.0x | 90.0x |"
    kd = next(l for l in lines if l.startswith("| hessian_kd | 8.77"))
    assert kd == "| hessian_kd | 8.77 | 3.10 | - | - | - | - |"
    md_und = next(l for l in lines if l.startswith("| undistilled | 0.50 of 4"))
    assert md_und == ("| undistilled | 0.50 of 4, 1 ps | 0.688 | 2 / 1 | 3 of 4 | 1.00 | 0.500 / 0.250 | "
                      "30.0 / 10.0 |")
    assert "| hessian_kd | - | - | - | - | - | - | - |" in lines


def test_write_report_files_and_names(runs, tmp_path):
    out = tmp_path / "out"
    report = write_report(runs, str(out), names=["PaiNN", "PaiNN + Hessian KD"])
    assert [r["method"] for r in report["methods"]] == ["PaiNN", "PaiNN + Hessian KD"]
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (out / "report.md").read_text()
    assert "| PaiNN + Hessian KD | 8.77 | 3.10 | - |" in md and "bench.json missing" in md
    assert json.loads((out / "report.json").read_text())["methods"][0]["speedup_64"] == pytest.approx(30.0)


def test_cli_and_errors(runs, tmp_path, capsys):
    from training.cli import main

    assert main(["report", *runs, "-o", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "md_stability.png").stat().st_size > 0
    assert main(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "o2")]) == 2
    assert main(["report", *runs, "--names", "one", "-o", str(tmp_path / "o3")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["report", str(empty), "-o", str(tmp_path / "o4")]) == 0  # everything '-', plots still drawn
    assert "has none of eval.json, bench.json, md.json" in capsys.readouterr().err
    assert "| empty | - | - | - | - | - | - |" in (tmp_path / "o4" / "report.md").read_text()


def test_malformed_run_files_are_one_clear_error(tmp_path):
    from engine.errors import HessforgeError

    for name, content in (("eval.json", {"student_vs_reference": None}), ("md.json", {"nvt": {"trajectories": 3}})):
        run = tmp_path / name.split(".")[0]
        run.mkdir()
        (run / name).write_text(json.dumps(content))
        with pytest.raises(HessforgeError, match=f"{run}: unexpected content"):
            collect([str(run)])


def test_teacher_row_names_whose_numbers_it_holds(tmp_path):
    """The teacher row's MAE comes from the labels' teacher, its ns/day from bench's --compare model: when
    they are different models the row and a note say so; runs against different teachers get a note."""
    def run(name, teacher, bench_teacher):
        d = tmp_path / name
        d.mkdir()
        (d / "eval.json").write_text(json.dumps(eval_json(20.0, 3.0, teacher)))
        b = bench(300.0, 1800.0, 1024)
        b = json.loads(json.dumps(b).replace('"ani1x"', json.dumps(bench_teacher)))
        (d / "bench.json").write_text(json.dumps(b))
        return str(d)

    same = collect([run("a", "ani1x", "ani1x")])
    assert same["teacher"]["method"] == "teacher (ani1x)" and same["notes"] == []
    other = collect([run("b", "ani1x", "mace-off-l-arch")])
    assert other["teacher"]["method"] == "teacher (ani1x; ns/day: mace-off-l-arch)"
    assert len(other["notes"]) == 1 and "another model" in other["notes"][0]
    mixed = collect([run("c", "ani1x", "ani1x"), run("d", "mace:x.model", "ani1x")])
    assert mixed["teacher"]["method"] == "teacher (ani1x)"
    assert len(mixed["notes"]) == 1 and "ani1x: c; mace:x.model: d" in mixed["notes"][0]
    write_report([str(tmp_path / "b")], str(tmp_path / "out"))
    assert "another model" in (tmp_path / "out" / "report.md").read_text()
