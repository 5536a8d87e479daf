#!/usr/bin/python3
"""The C++ result store's files as h5py/pandas users see them.

Invoked by CTest as `python3 test_h5py_read.py <quantlab>` with cwd = the build directory and
QL_SOURCE_DIR in the environment. Runs configs/tests/tiny.yaml, then checks the HDF5 layout,
that every string decodes as UTF-8, that the tables have their columns and finite values for
ok runs, that `quantlab export-csv` agrees with the HDF5 slices table, and that
analysis/report.py writes its report. Exit 77 (CTest skip) only when h5py/pandas are missing.
"""
import os
import shutil
import subprocess
import sys
import tempfile

try:
    import h5py
    import numpy as np
    import pandas as pd
except ImportError as e:  # pragma: no cover - depends on the machine
    print(f"SKIP: cannot import h5py/pandas/numpy ({e})")
    sys.exit(77)

RUN_ATTRS_STR = ["run_id", "label", "config_hash", "config_yaml", "code_revision", "status",
                 "message", "started_at"]
RUN_ATTRS_NUM = ["seed", "threads", "seconds_total", "seconds_calib", "seconds_quant",
                 "seconds_eval", "order"]
COLUMNS = {
    "params": ["key", "value"],
    "layers": ["layer", "algorithm", "scheme", "bits", "group_size", "bpw", "weight_mse",
               "rel_err_h", "rel_err_eval", "out_mse", "sqnr_db", "cosine", "max_abs", "seconds"],
    "diagnostics": ["layer", "step", "algorithm", "name", "value"],
    "summary": ["metric", "value", "ci_low", "ci_high", "delta_vs_fp"],
    "slices": ["metric", "slice_key", "slice_value", "n_units", "n_tokens", "value", "ci_low",
               "ci_high", "ref_value", "delta", "delta_ci_low", "delta_ci_high", "flags",
               "flags_text"],
    "disparity": ["metric", "slice_key", "summary", "on", "worst_slice", "value", "ci_low",
                  "ci_high", "p_worst"],
    "numeric_env": ["key", "value"],
}
# Keys of the numeric environment every run records (core/numerics.h).
NUMERIC_ENV_KEYS = ["mode", "threads", "portable_kernels", "blas_config", "blas_kernels",
                    "blas_library", "openblas_coretype_env", "lapack_version", "cpu_model",
                    "cpu_features", "libc", "glibc_tunables_env", "compiler", "compile_flags",
                    "eigen"]
FLAG_EMPTY = 1 << 3

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)
    return cond


def utf8(v, what):
    """A fixed-length string value (bytes) decoded as UTF-8."""
    if not check(isinstance(v, (bytes, np.bytes_)), f"{what}: expected bytes, got {type(v)}"):
        return str(v)
    try:
        return bytes(v).decode("utf-8")
    except UnicodeDecodeError as e:
        check(False, f"{what}: not UTF-8 ({e})")
        return ""


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode != 0:
        print(p.stdout)
        print(p.stderr)
    return p


def check_table(g, name, what):
    if not check(name in g, f"{what}: missing table '{name}'"):
        return None
    ds = g[name]
    check(ds.dtype.names is not None, f"{what}/{name}: not a compound dataset")
    names = list(ds.dtype.names or ())
    check(names == COLUMNS[name], f"{what}/{name}: columns {names} != {COLUMNS[name]}")
    data = ds[()]
    ctype = ds.id.get_type()
    frame = {}
    for i, col in enumerate(names):
        if data.dtype[col].kind == "S":
            mt = ctype.get_member_type(i)
            check(not mt.is_variable_str() and mt.get_cset() == h5py.h5t.CSET_UTF8,
                  f"{what}/{name}.{col}: fixed-length UTF-8 string")
            frame[col] = [utf8(v, f"{what}/{name}.{col}") for v in data[col]]
        else:
            frame[col] = data[col]
    return pd.DataFrame(frame, columns=names)


def finite(values):
    return bool(np.all(np.isfinite(np.asarray(values, dtype=float))))


def finite_or_exact(frame, column):
    """Finite values, except +inf for an SQNR metric of an exact (error-free) output."""
    v = frame[column].to_numpy(dtype=float)
    sqnr = frame["metric"].str.contains("sqnr").to_numpy()
    return bool(np.all(np.isfinite(v) | (sqnr & (v == np.inf))))


def main():
    if len(sys.argv) != 2:
        print("usage: test_h5py_read.py <quantlab-binary>")
        return 2
    quantlab = os.path.abspath(sys.argv[1])
    src = os.environ.get("QL_SOURCE_DIR") or os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))))
    tiny = os.path.join(src, "configs", "tests", "tiny.yaml")
    tmp = tempfile.mkdtemp(prefix="ql_h5py_")
    try:
        return body(quantlab, src, tiny, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def body(quantlab, src, tiny, tmp):
    h5path = os.path.join(tmp, "tiny.h5")
    p = run([quantlab, "run", tiny, "--output", h5path, "--quiet"])
    if not check(p.returncode == 0, f"quantlab run exited {p.returncode}"):
        return 1
    check(os.path.isfile(h5path), "results file written")
    check(not [f for f in os.listdir(tmp) if ".tmp-" in f], "no temp files left behind")

    hdf_slices = []
    run_ids = []
    with h5py.File(h5path, "r") as f:
        check(utf8(f.attrs.get("format", b""), "format") == "quantlab-results", "format attr")
        check(int(f.attrs.get("format_version", -1)) == 1, "format_version attr")
        if not check("runs" in f and len(f["runs"]) > 0, "at least one run stored"):
            return 1
        groups = sorted(f["runs"].values(), key=lambda g: int(g.attrs["order"]))
        orders = [int(g.attrs["order"]) for g in groups]
        check(len(set(orders)) == len(orders), f"distinct order attrs {orders}")
        n_ok = 0
        for g in groups:
            name = g.name.rsplit("/", 1)[-1]
            what = f"run {name}"
            attrs = {}
            for a in RUN_ATTRS_STR:
                if check(a in g.attrs, f"{what}: attr {a}"):
                    attrs[a] = utf8(g.attrs[a], f"{what}.{a}")
            for a in RUN_ATTRS_NUM:
                check(a in g.attrs and np.isscalar(g.attrs[a]), f"{what}: numeric attr {a}")
            check(attrs.get("run_id") == name, f"{what}: run_id attr matches group name")
            check(attrs.get("config_hash") == name, f"{what}: config_hash == run_id")
            check(g.attrs["seed"].dtype == np.uint64, f"{what}: seed is uint64")
            check(g.attrs["threads"].dtype == np.int64, f"{what}: threads is int64")
            status = attrs.get("status")
            check(status in ("ok", "failed"), f"{what}: status '{status}'")
            run_ids.append(name)

            tables = {t: check_table(g, t, what) for t in COLUMNS}
            env = tables["numeric_env"]
            if env is not None:
                got = dict(zip(env["key"], env["value"]))
                check(list(got) == NUMERIC_ENV_KEYS, f"{what}: numeric_env keys {list(got)}")
                check(got.get("mode") == "fast", f"{what}: numeric_env mode {got.get('mode')}")
                check(got.get("threads") == str(int(g.attrs["threads"])),
                      f"{what}: numeric_env threads matches the threads attr")
                check("OpenBLAS" in got.get("blas_config", ""), f"{what}: blas_config names OpenBLAS")
            check("units" in g, f"{what}: units group")
            if "units" in g:
                u = g["units"]
                ids = [utf8(x, f"{what}/units/ids") for x in u["ids"][()]]
                cols = [utf8(x, f"{what}/units/columns") for x in u["columns"][()]]
                sums = u["sums"][()]
                check(sums.ndim == 2 and sums.shape == (len(ids), len(cols)),
                      f"{what}: units sums shape {sums.shape} vs {len(ids)} x {len(cols)}")
                utf8(u.attrs.get("token_column", b""), f"{what}/units.token_column")
                for key in u["attr_keys"][()]:
                    key = utf8(key, f"{what}/units/attr_keys")
                    check(len(u["attrs"][key]) == len(ids), f"{what}: units attrs/{key} length")
                if status == "ok":
                    check(finite(sums), f"{what}: finite unit sums")

            if status != "ok":
                continue
            n_ok += 1
            layers, slices, summary = tables["layers"], tables["slices"], tables["summary"]
            if layers is not None:
                check(len(layers) > 0, f"{what}: has layer rows")
                for c in ["bpw", "weight_mse", "rel_err_h", "rel_err_eval", "out_mse", "cosine",
                          "max_abs", "seconds"]:
                    check(finite(layers[c]), f"{what}: layers.{c} finite")
                # An exact (FP) layer has infinite SQNR; anything else must be finite.
                sq = layers["sqnr_db"].to_numpy(dtype=float)
                ok_sq = np.isfinite(sq) | ((sq == np.inf) & (layers["out_mse"].to_numpy() == 0))
                check(bool(np.all(ok_sq)), f"{what}: layers.sqnr_db finite (or +inf when exact)")
            if summary is not None:
                check(len(summary) > 0, f"{what}: has summary rows")
                check(finite_or_exact(summary, "value"), f"{what}: summary values finite")
            if slices is not None:
                check(len(slices) > 0, f"{what}: has slice rows")
                check((slices["slice_key"] == "__all__").any(), f"{what}: overall slice rows")
                nonempty = slices[(slices["flags"].to_numpy() & FLAG_EMPTY) == 0]
                check(finite_or_exact(nonempty, "value"), f"{what}: slices.value finite")
                # Bootstrap bounds of an infinite SQNR are NaN; every other bound is finite.
                finite_rows = nonempty[np.isfinite(nonempty["value"].to_numpy(dtype=float))]
                for c in ["ci_low", "ci_high"]:
                    check(finite(finite_rows[c]), f"{what}: slices.{c} finite")
                check(bool(np.all(nonempty["n_units"] > 0)), f"{what}: slices n_units > 0")
                frame = slices.copy()
                frame.insert(0, "run_id", name)
                hdf_slices.append(frame)
        check(n_ok > 0, "at least one ok run")

    # export-csv agrees with the HDF5 slices table, value for value.
    csv_dir = os.path.join(tmp, "csv")
    p = run([quantlab, "export-csv", h5path, "-o", csv_dir])
    if check(p.returncode == 0, f"quantlab export-csv exited {p.returncode}"):
        for name in ["runs.csv", "layers.csv", "slices.csv", "disparity.csv", "diagnostics.csv"]:
            check(os.path.isfile(os.path.join(csv_dir, name)), f"export wrote {name}")
        runs_csv = pd.read_csv(os.path.join(csv_dir, "runs.csv"), dtype={"run_id": str})
        check(list(runs_csv["run_id"]) == run_ids, "runs.csv lists every run in order")
        strings = ["run_id", "label", "metric", "slice_key", "slice_value", "flags"]
        # float_precision="round_trip": pandas' default fast parser may be off by an ulp.
        csv = pd.read_csv(os.path.join(csv_dir, "slices.csv"), dtype={c: str for c in strings},
                          float_precision="round_trip",
                          keep_default_na=False, na_values={c: ["nan", "-nan"] for c in [
                              "value", "ci_low", "ci_high", "ref_value", "delta_vs_fp",
                              "delta_ci_low", "delta_ci_high"]})
        hdf = pd.concat(hdf_slices, ignore_index=True) if hdf_slices else pd.DataFrame()
        if check(len(csv) == len(hdf), f"slices.csv has {len(csv)} rows, HDF5 {len(hdf)}"):
            for c in ["run_id", "metric", "slice_key", "slice_value"]:
                check(list(csv[c]) == list(hdf[c]), f"slices.csv column {c} matches HDF5")
            check(list(csv["flags"]) == list(hdf["flags_text"]), "slices.csv flags == flags_text")
            check(list(csv["n"]) == list(hdf["n_units"]), "slices.csv n == n_units")
            check(list(csv["n_tokens"]) == list(hdf["n_tokens"]), "slices.csv n_tokens")
            pairs = [("value", "value"), ("ci_low", "ci_low"), ("ci_high", "ci_high"),
                     ("ref_value", "ref_value"), ("delta_vs_fp", "delta"),
                     ("delta_ci_low", "delta_ci_low"), ("delta_ci_high", "delta_ci_high")]
            for c_csv, c_h5 in pairs:
                a = csv[c_csv].to_numpy(dtype=float)
                b = hdf[c_h5].to_numpy(dtype=float)
                same = (a == b) | (np.isnan(a) & np.isnan(b))
                check(bool(np.all(same)), f"slices.csv {c_csv} equals HDF5 {c_h5} exactly")

    # The Python report reads the same file.
    out = os.path.join(tmp, "report")
    p = run([sys.executable, os.path.join(src, "analysis", "report.py"), h5path, "-o", out])
    if check(p.returncode == 0, f"analysis/report.py exited {p.returncode}"):
        md = os.path.join(out, "report.md")
        if check(os.path.isfile(md), "report.md written"):
            with open(md, encoding="utf-8") as fh:
                text = fh.read()
            check("| run | status |" in text, "report.md has the runs table")
            check("## Numeric environment" in text and "| blas_kernels |" in text,
                  "report.md has the numeric environment")
        pngs = [x for x in os.listdir(out) if x.endswith(".png")]
        check(len(pngs) >= 1, f"at least one PNG written ({pngs})")
        for x in pngs:
            with open(os.path.join(out, x), "rb") as fh:
                check(fh.read(8) == b"\x89PNG\r\n\x1a\n", f"{x} is a PNG")

    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
