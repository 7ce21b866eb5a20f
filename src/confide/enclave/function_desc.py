"""Function descriptors (PROTOCOL.md section 4): built-ins shipped in the TCB, parties' Python
functions, their digests, and opening source sealed to the enclave service (confidential code,
sealed on the owner's machine by confide.client.function_seal)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import hpke_box
from .encoding import canonical_json, check_fields, get_typed
from .errors import FormatError, IntegrityError
from .keys import Identity, PublicIdentity
from .task_fields import (
    BUILTINS_DIR,
    FUNCTION_FORMAT,
    FUNCTION_KINDS,
    FUNCTION_NAME_RE,
    FUNCTION_SOURCE_PURPOSE,
    HEX64_RE,
    MAX_DESCRIPTION_LEN,
    MAX_INPUTS,
    MAX_MANIFEST_BYTES,
    MAX_OUTPUTS,
    MAX_REQUIREMENTS,
    MAX_SOURCE_BYTES,
    PROVIDED_REQUIREMENTS,
    VERSION_RE,
    check_unique,
    fingerprint_field,
    hex_field,
    identifier,
    list_field,
    load_object,
    pattern_field,
    sha256_hex,
    text_field,
)

# ---- functions (section 4) -------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionDescriptor:
    kind: str  # "builtin" | "python"
    name: str
    version: str
    owner: str  # fingerprint of the function's owner, "" for a built-in
    source_sha256: str
    requirements: tuple[str, ...]
    description: str
    inputs: tuple[str, ...]  # ("*",): any inputs; else exactly these names
    outputs: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FUNCTION_FORMAT,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "owner": self.owner,
            "source_sha256": self.source_sha256,
            "requirements": list(self.requirements),
            "description": self.description,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
        }

    @property
    def digest(self) -> str:
        return sha256_hex(canonical_json(self.to_json()))

    @property
    def any_inputs(self) -> bool:
        return self.inputs == ("*",)


def parse_function_descriptor(data: str | bytes | Mapping[str, Any]) -> FunctionDescriptor:
    w = "function descriptor"
    obj = load_object(data, MAX_MANIFEST_BYTES, w)
    check_fields(
        obj,
        required=(
            "format",
            "kind",
            "name",
            "version",
            "owner",
            "source_sha256",
            "requirements",
            "description",
            "inputs",
            "outputs",
        ),
        where=w,
    )
    if obj["format"] != FUNCTION_FORMAT:
        raise FormatError(f"unknown descriptor format {str(obj['format'])[:80]!r}", where=w)
    kind = get_typed(obj, "kind", str, where=w)
    if kind not in FUNCTION_KINDS:
        raise FormatError(f"kind must be one of {', '.join(FUNCTION_KINDS)}, got {kind[:40]!r}", where=w)
    name = pattern_field(
        obj, "name", FUNCTION_NAME_RE, "a function name (letters, digits, . _ -; at most 64)", w
    )
    w = f"function descriptor {name!r}"
    version = pattern_field(obj, "version", VERSION_RE, "a version (letters, digits, . _ + -; at most 32)", w)
    owner = get_typed(obj, "owner", str, where=w)
    if kind == "builtin" and owner:
        raise FormatError('a built-in has no owner (owner must be "")', where=w)
    if owner:
        owner = fingerprint_field(obj, "owner", w)
    requirements = list_field(obj, "requirements", w, low=0, high=MAX_REQUIREMENTS)
    for req in requirements:
        if req not in PROVIDED_REQUIREMENTS:
            raise FormatError(
                f"requirement {str(req)[:40]!r} is not provided by the enclave "
                f"(available: {', '.join(PROVIDED_REQUIREMENTS)})",
                where=w,
            )
    check_unique(requirements, "requirement", w)
    inputs = list_field(obj, "inputs", w, low=0, high=MAX_INPUTS)
    if inputs != ["*"]:
        for n in inputs:
            identifier(n, "input name", f"{w}: inputs")
        check_unique(inputs, "input name", w)
    outputs = list_field(obj, "outputs", w, low=1, high=MAX_OUTPUTS)
    if outputs == ["*"] and kind != "builtin":
        raise FormatError("only a built-in may name its outputs at run time (outputs ['*'])", where=w)
    if outputs != ["*"]:  # a built-in whose outputs its parameters name (flow: the job's sinks)
        for n in outputs:
            _output_name(n, f"{w}: outputs")
        check_unique(outputs, "output name", w)
    return FunctionDescriptor(
        kind=kind,
        name=name,
        version=version,
        owner=owner,
        source_sha256=hex_field(obj, "source_sha256", HEX64_RE, w),
        requirements=tuple(requirements),
        description=text_field(obj, "description", w, max_len=MAX_DESCRIPTION_LEN),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
    )


def _output_name(value: Any, where: str) -> str:
    name = identifier(value, "output name", where)
    if name.startswith("_"):
        raise FormatError(
            f"output name {name!r} is reserved (names starting with _ are the enclave's)", where=where
        )
    return name


def function_digest(descriptor: FunctionDescriptor | Mapping[str, Any]) -> str:
    """H(canonical_json(descriptor)); a mapping is strictly parsed first."""
    if not isinstance(descriptor, FunctionDescriptor):
        descriptor = parse_function_descriptor(descriptor)
    return descriptor.digest


def function_descriptor(
    *,
    name: str,
    source: str,
    owner: PublicIdentity | str,
    description: str,
    version: str = "1",
    requirements: Sequence[str] = (),
    inputs: Sequence[str] = ("*",),
    outputs: Sequence[str],
) -> FunctionDescriptor:
    """The descriptor of a party's Python function (``kind: python``), checked as the enclave will."""
    owner_fp = owner.fingerprint if isinstance(owner, PublicIdentity) else owner
    obj = FunctionDescriptor(
        kind="python",
        name=name,
        version=version,
        owner=owner_fp,
        source_sha256=sha256_hex(source.encode("utf-8")),
        requirements=tuple(sorted(requirements)),
        description=description,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
    ).to_json()
    return parse_function_descriptor(obj)


@dataclass(frozen=True)
class _Builtin:
    file: str
    requirements: tuple[str, ...]
    description: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    # analytics built-ins: the manifest names any non-empty subset of the outputs, and for each prefix
    # P here an output P<input> is allowed per input, sealed to that input's owner and nobody else
    optional_outputs: bool = False
    per_input_outputs: tuple[str, ...] = ()
    # flow: the outputs are the job's sinks, checked against params.job by the enclave at run time
    outputs_from_params: bool = False
    # (output, input) pairs: that output, when the manifest names it, is sealed to that input's owner
    # and nobody else (password-check: the result only to the owner of the password)
    owner_only_outputs: tuple[tuple[str, str], ...] = ()


BUILTINS: dict[str, _Builtin] = {
    "flow": _Builtin(
        "flow_job.py",
        (),
        "Runs a confidential dataflow job (confide.flow: map, flat_map, filter, key_by, reduce_by_key, "
        "aggregate_by_key, group_by_key, join, distinct, sort_by, union, count) over the inputs, "
        "inside the enclave: params.job holds the job's function module (readable here), the SHA-256 "
        "of each function and its stages; each stage's functions run in the sandbox, every partition "
        "is verified consumed exactly once, and each of the job's outputs (its save() names) becomes "
        "the task output of that name: JSON lines of records (or text lines), sealed to its "
        "recipients. The receipt carries the verified per-stage counts.",
        ("*",),
        ("*",),
        outputs_from_params=True,
    ),
    "infer": _Builtin(
        "onnx_infer.py",
        ("numpy", "onnxruntime"),
        "Runs an ONNX model (input model: a model uploaded by its owner, `confide model upload`) on "
        "input data (a NumPy .npz archive with one array per model input, or a .npy array for a "
        "one-input model) in the enclave's sandbox. Params: mode: all-in-enclave (default: ONNX "
        "Runtime on the CPU; the model and the data are decrypted only in the enclave and no "
        "accelerator sees either), outsourced-verified (every MatMul/Gemm/Conv computed by the "
        "host's untrusted accelerator and checked with Freivalds' algorithm before use; the "
        "accelerator sees the 8-bit weights and the quantized inputs in clear) or "
        "outsourced-blinded+verified (the same, with every activation blinded by a fresh random "
        "mask: the accelerator sees the 8-bit weights in clear and nothing about the inputs) or "
        "split (a model larger than the enclave's memory budget, uploaded with the external-weights "
        "layout, runs as consecutive submodels that each fit, ONNX Runtime on the CPU: the enclave "
        "decrypts only the graph and each submodel's weights chunk by chunk, freed after it; no "
        "accelerator sees anything; the host sees which weight bytes are read when, so the layer "
        "boundaries and each submodel's time, nothing of the data); "
        "outputs (a list of model output names; default all); reply_timeout_s (outsourced modes: "
        "seconds to wait for each accelerator reply, default 120). A wrong accelerator result "
        "fails the run naming the layer. Outputs, those the manifest names: outputs (.npz, one "
        "array per model output) and, in split mode, report (JSON: the submodels' count, weight "
        "and activation bytes, and the run's peak memory: sizes, nothing of the data).",
        ("model", "data"),
        ("outputs", "report"),
        optional_outputs=True,
    ),
    "describe": _Builtin(
        "describe.py",
        ("pandas",),
        "Per-column statistics of the union of the inputs (UTF-8 CSV with the same header), with a "
        "cohort threshold. Params: k (required, >= 2: a statistic over fewer than k values is "
        "suppressed and a category seen fewer than k times is not named), columns (default all), "
        "max_categories (10), min_max (false: true also releases each numeric column's minimum and "
        "maximum, one row's exact value each). Output: report (JSON: rows, and per column its kind, "
        "count, and mean and std, or distinct count, the categories seen at least k times and how "
        "many rows hold an unnamed one).",
        ("*",),
        ("report",),
    ),
    "gbdt-train": _Builtin(
        "gbdt_train.py",
        ("numpy", "pandas", "xgboost"),
        "Trains an XGBoost gradient-boosted tree model (classifier or regressor) on the union of all "
        "inputs: CSV files with the same header. Params: label (required), objective "
        "(binary:logistic), rounds, max_depth, eta, seed, features or exclude (lists of column names; "
        "default: every column but the label). Outputs: model (XGBoost JSON model) and "
        "report (JSON: rows per input, features, label balance, each feature's total split gain). "
        "Deterministic for a given seed.",
        ("*",),
        ("model", "report"),
    ),
    "gbdt-predict": _Builtin(
        "gbdt_predict.py",
        ("numpy", "pandas", "xgboost"),
        "Scores a CSV (input data; a label column, if named in params.label, is dropped) with an "
        "XGBoost JSON model (input model). Output: predictions, a CSV with one score column.",
        ("model", "data"),
        ("predictions",),
    ),
    "logistic-regression-train": _Builtin(
        "numeric_ml.py",
        ("numpy", "scikit-learn"),
        "Trains a logistic-regression classifier (scikit-learn, lbfgs, L2; multinomial for more than "
        "two classes) on the union of the inputs: UTF-8 CSV files with the same header, every feature "
        "cell a finite decimal number (another is refused naming input, line and column). Params: "
        "label (required; at least two classes), features or exclude (lists of column names; default "
        "every column but the label), C (1.0, inverse L2 strength), max_iter (100), fit_intercept "
        "(true), standardize (true: features scaled by the training mean and standard deviation). "
        "Outputs, those the manifest names: model (JSON, never pickle: label, features, classes, "
        "coefficients, intercepts, and each feature's training mean and standard deviation) and "
        "report (JSON: rows per input, features, every class with its row count, iterations, "
        "converged), each to its recipients only.",
        ("*",),
        ("model", "report"),
        optional_outputs=True,
    ),
    "logistic-regression-predict": _Builtin(
        "numeric_ml.py",
        ("numpy",),
        "Scores input data (UTF-8 CSV with the model's feature columns; params.label names a column "
        "to ignore) with input model (logistic-regression-train's JSON model, checked field by field "
        "as hostile input). Output: predictions (CSV, one row per data row in order: the probability "
        "of each class, or of the second class when there are two, and the most likely class), to "
        "its recipients only: per-row values.",
        ("model", "data"),
        ("predictions",),
    ),
    "pca": _Builtin(
        "numeric_ml.py",
        ("numpy", "scikit-learn"),
        "Principal component analysis (scikit-learn, full SVD) of the union of the inputs (UTF-8 CSV "
        "with the same header). Params: n_components (required, 1..number of columns), min_rows "
        "(required, >= 2: fewer rows are refused and nothing is computed), columns (default every "
        "column whose cells are all numbers), standardize (false). Outputs, those the manifest names: "
        "components (JSON: columns, their means and scales, the components, explained variance and "
        "its ratio, the number of rows) and projected (CSV: every row's scores on the components, in "
        "row order: PER-ROW values, one line per person of the inputs, which min_rows does not "
        "protect), each to its recipients only.",
        ("*",),
        ("components", "projected"),
        optional_outputs=True,
    ),
    "psi": _Builtin(
        "psi.py",
        ("pandas",),
        "Private set intersection of two or more inputs' id columns (UTF-8 CSV with a header). Params: "
        "column (required: one id column name for all inputs, or input name -> column), hash (false: "
        "true makes ids leave as unsalted SHA-256 hex of their normalised form, which anyone can test "
        "a guessed id against), max_id_chars (1024). Ids are normalised in the enclave: whitespace "
        "stripped, Unicode NFC, case-folded; empty ids match nothing. Outputs, any of: size (JSON: the "
        "number of distinct ids in every input), members_<input> (CSV column member: 1/0 per data "
        "row of <input>, in its order; the enclave refuses a manifest that seals it to anyone but that "
        "input's owner), intersection (CSV column id: the common ids, sorted, to its recipients). "
        "CLI: confide task create --function psi --input a=REF --input b=REF --output size=PARTY "
        "--output members_a=OWNER_OF_A --param column=email (or --params-json).",
        ("*",),
        ("intersection", "members_", "size"),
        optional_outputs=True,
        per_input_outputs=("members_",),
    ),
    "join-aggregate": _Builtin(
        "join_aggregate.py",
        ("opendp", "pandas"),
        "Joins the inputs (UTF-8 CSV with a header) on a key column (inner join on the key normalised "
        "like psi's ids), then aggregates by groups and suppresses every group with fewer than k "
        "distinct keys. Params: key (required: a name, or input name -> column), k (required, >= 2, "
        "approved by every owner with this manifest), group_by (column references: column, or "
        "input.column where ambiguous), aggregates (list of {op: count|sum|avg|min|max, column, as}; "
        "default a row count), avg_places (6), max_field_chars (4096), max_join_rows (10^7). Sums "
        "are exact decimals; avg is rounded half-even. Outputs: result (CSV: group columns and aggregates of the released "
        "groups only) and report (JSON: k, groups released, groups suppressed: that count leaves "
        "too). Optional dp (differential privacy with OpenDP; every field approved with the manifest): "
        "epsilon (> 0, the task's total), mechanism (laplace or gaussian), delta (required for gaussian "
        "or group_by), max_contributions (joined rows kept per key), bounds ([lo, hi] per summed column, "
        "values clamped to it), budget (per input: its owner's total epsilon for that dataset, charged "
        "by the enclave in its sealed state before any input is decrypted; a task past it is refused). "
        "With dp only the row count and sums are allowed; they leave with OpenDP's noise, a group is "
        "released when its noisy count reaches max(k, the threshold delta needs), and the report gives "
        "the privacy loss spent instead of the suppressed count.",
        ("*",),
        ("report", "result"),
    ),
    "sql": _Builtin(
        "sql.py",
        ("duckdb", "opendp"),  # and pyarrow's CSV reader, like join-aggregate's Parquet inputs
        "Runs one SQL SELECT (params.query, approved as written) in DuckDB over the inputs (UTF-8 CSV "
        "with a header, each a table named after its input) under an analysis rule (params.rule, "
        "approved with it): tables (exactly the inputs; per table its allowed columns, join_columns "
        "and optional id_column), aggregates (some of count, sum, avg, min, max), min_group_size k "
        "(>= 2), join_required (true: every table must be joined), allow_raw_columns (false: every "
        "output is an aggregate or a GROUP BY column), aggregate_arithmetic (false: with it, an aggregate "
        "may take + - * of allowed columns and numeric literals up to 1000; an overflow on one row then "
        "fails the run). The rule is checked on DuckDB's parse tree "
        "before any data is loaded, naming the clause that breaks it: INNER joins on join columns "
        "only; aggregates over one plain column; no subquery, CTE, UNION/INTERSECT/EXCEPT, VALUES, "
        "table function, window, CAST of a column (TRY_CAST only), arithmetic on row values, or statement other "
        "than SELECT. Every output row whose group has fewer than k distinct id_column values (of each "
        "joined table that names one) or fewer than k rows is suppressed. Outputs: result (CSV: the "
        "released rows) and report (JSON: k, rows released; the suppressed count is not released). "
        "DuckDB runs single-threaded with no file or network access and no extensions; a run-time "
        "error's text is withheld. Optional params: memory_limit_mib (1024), max_result_rows (10^6), dp "
        "(differential privacy as join-aggregate's, delta always required, bounds per table.column: the "
        "query may then output only GROUP BY columns, count(*) and sum of bounded columns, without "
        "HAVING, ORDER BY or LIMIT, over tables with an id_column joined on it alone; each table keeps "
        "max_contributions rows per id, bounded columns are clamped, the counts and sums leave with "
        "OpenDP's noise, a group on its noisy count, and each input's budget is charged).",
        ("*",),
        ("report", "result"),
    ),
    "ordered-set-join": _Builtin(
        "ordered_set_join.py",
        (),
        "Streaming merge join of two or more inputs (UTF-8 CSV with a header), each sorted by its id "
        "column: ids normalised like psi's (whitespace stripped, Unicode NFC, case-folded; empty ids "
        "match nothing) must be strictly ascending in code point order, and an input out of order or "
        "with an id twice is refused naming the input and line. Memory does not grow with the inputs. "
        "Params: column (required: one id column name for all inputs, or input name -> column), "
        "columns (list of input.column: the cells joined carries; default none), max_id_chars (1024), "
        "max_field_chars (65536). Outputs, any of: size (JSON: how many ids are in every input), "
        "members_<input> (CSV column member: 1/0 per data row of <input>, in its order; the enclave "
        "refuses a manifest that seals it to anyone but that input's owner), joined (CSV: column id, "
        "the common normalised ids ascending, then one column input.column per params.columns entry "
        "with that input's cell, to its recipients). CLI: confide task create --function "
        "ordered-set-join --input a=REF --input b=REF --output size=PARTY --param column=id.",
        ("*",),
        ("joined", "members_", "size"),
        optional_outputs=True,
        per_input_outputs=("members_",),
    ),
    "password-check": _Builtin(
        "password_check.py",
        (),
        "Checks one password (input password: one UTF-8 line) against a breach corpus (input exposed: "
        "lines of SHA1HEX:COUNT as in Have I Been Pwned's Pwned Passwords download, or bare SHA1HEX) "
        "by the SHA-1 of the password's UTF-8 bytes. The corpus is read line by line to its end "
        "whatever the password (a malformed line is refused naming its number, never its text; errors "
        "never quote the password). Output: result (JSON count and exposed, padded to a fixed 96 "
        "bytes); the enclave refuses a manifest that seals it to anyone but the owner of input "
        "password. The corpus owner learns only that a check ran. No params.",
        ("exposed", "password"),
        ("result",),
        owner_only_outputs=(("result", "password"),),
    ),
    "sign": _Builtin(
        "sign.py",
        ("cryptography",),
        "Signs input message (bytes) with input key (an unencrypted PKCS#8 private key, PEM or DER: "
        "RSA of at least 2048 bits or Ed25519, uploaded sealed by its owner; no other party and no "
        "host ever sees it). Params: algorithm (required: ed25519, rsa-pss-sha256 (MGF1-SHA-256, "
        "32-byte salt) or rsa-pkcs1v15-sha256; must fit the key). Outputs, any of: signature (the raw "
        "signature bytes) and public_key (PEM SubjectPublicKeyInfo), to their recipients. No part of "
        "the private key leaves: an encrypted, garbled, short or mismatched key is refused naming only "
        "its type and size.",
        ("key", "message"),
        ("public_key", "signature"),
        optional_outputs=True,
    ),
}
BUILTIN_VERSION = "1"


def check_task_outputs(
    descriptor: FunctionDescriptor,
    inputs: Mapping[str, str],
    outputs: Mapping[str, Sequence[str]],
    where: str,
) -> None:
    """The manifest's outputs (name -> recipients) against what the function writes; `inputs`: name
    -> owner. Exactly the descriptor's outputs, except for analytics built-ins (see _Builtin)."""
    spec = BUILTINS.get(descriptor.name) if descriptor.kind == "builtin" else None
    if spec is not None and spec.outputs_from_params:
        return
    for out, inp in spec.owner_only_outputs if spec is not None else ():
        if out in outputs:
            _only_to_owner(out, inp, inputs, outputs[out], f"is for the owner of input {inp!r} only", where)
    if spec is None or not (spec.optional_outputs or spec.per_input_outputs):
        if sorted(outputs) != sorted(descriptor.outputs):
            raise FormatError(
                f"outputs {sorted(outputs)} differ from the outputs function "
                f"{descriptor.name!r} writes {sorted(descriptor.outputs)}",
                where=where,
            )
        return
    for name, recipients in outputs.items():
        prefix = next((p for p in spec.per_input_outputs if name.startswith(p)), None)
        if prefix is None:
            if name not in descriptor.outputs:
                raise FormatError(
                    f"output {name!r} is not one the function {descriptor.name!r} writes "
                    f"({', '.join(o + '<input>' if o in spec.per_input_outputs else o for o in descriptor.outputs)})",
                    where=where,
                )
            continue
        inp = name[len(prefix) :]
        _only_to_owner(name, inp, inputs, recipients, f"describes the rows of input {inp!r}", where)


def _only_to_owner(
    name: str, inp: str, inputs: Mapping[str, str], recipients: Sequence[str], why: str, where: str
) -> None:
    """Output `name` may be sealed to the owner of input `inp` and nobody else."""
    if inp not in inputs:
        raise FormatError(
            f"output {name!r} is for input {inp!r}, which the task does not have (inputs: {sorted(inputs)})",
            where=where,
        )
    if tuple(recipients) != (inputs[inp],):
        raise IntegrityError(
            f"output {name!r} {why}: it may be sealed only to that input's owner {inputs[inp]}, "
            f"not to {', '.join(recipients)}",
            where=where,
        )


def builtin_source(name: str) -> str:
    spec = BUILTINS.get(name)
    if spec is None:
        raise FormatError(
            f"unknown built-in function {name[:64]!r} (this build has: {', '.join(BUILTINS)})",
            where="built-in functions",
        )
    return (BUILTINS_DIR / spec.file).read_text(encoding="utf-8")


def builtin_descriptor(name: str) -> FunctionDescriptor:
    """The descriptor of a built-in of this build; its source is read from the enclave package."""
    spec = BUILTINS.get(name)
    source = builtin_source(name)
    assert spec is not None
    return FunctionDescriptor(
        kind="builtin",
        name=name,
        version=BUILTIN_VERSION,
        owner="",
        source_sha256=sha256_hex(source.encode("utf-8")),
        requirements=spec.requirements,
        description=spec.description,
        inputs=spec.inputs,
        outputs=spec.outputs,
    )


def check_function_source(descriptor: FunctionDescriptor, source: str) -> None:
    if len(source) > MAX_SOURCE_BYTES:
        raise FormatError(
            f"source longer than {MAX_SOURCE_BYTES} bytes", where=f"function {descriptor.name!r}"
        )
    got = sha256_hex(source.encode("utf-8", "surrogatepass"))
    if got != descriptor.source_sha256:
        raise IntegrityError(
            f"source has SHA-256 {got}, but the approved descriptor says {descriptor.source_sha256}",
            where=f"function {descriptor.name!r}",
        )


def source_binding(descriptor: FunctionDescriptor, service_fp: str) -> dict[str, str]:
    return {"function": descriptor.digest, "owner": descriptor.owner, "service": service_fp}


def open_function_source(sealed: bytes, *, descriptor: FunctionDescriptor, service: Identity) -> str:
    """Enclave side: open a confidential function's source and check it against the descriptor."""
    w = f"sealed source of function {descriptor.name!r}"
    if len(sealed) > MAX_SOURCE_BYTES + 64:
        raise FormatError(f"longer than {MAX_SOURCE_BYTES} bytes", where=w)
    plain = hpke_box.open_sealed(
        sealed,
        service.kem_key,
        FUNCTION_SOURCE_PURPOSE,
        where=w,
        **source_binding(descriptor, service.fingerprint),
    )
    try:
        source = plain.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("source is not UTF-8 text", where=w) from None
    check_function_source(descriptor, source)
    return source
