"""Machine learning on parties' tables for SDK users: tasks for the ``logistic-regression-train``,
``logistic-regression-predict`` and ``pca`` built-ins, and the words an approver reads about what
each output of such a task releases to whom.

The helpers only build a task through ``Client.create_task``; the enclave checks the parameters
again (min_rows, n_components, the model's fields) whatever a creator writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from confide.enclave.errors import ConfideError
from confide.enclave.manifest import Manifest

if TYPE_CHECKING:
    from confide.client.sdk import Client

TRAIN, PREDICT, PCA = "logistic-regression-train", "logistic-regression-predict", "pca"
TRAIN_OUTPUTS = ("model", "report")
PCA_OUTPUTS = ("components", "projected")


def _outputs(fn: str, wanted: Sequence[str], allowed: Sequence[str]) -> list[str]:
    names = list(wanted)
    bad = sorted(set(names) - set(allowed)) or (["(none)"] if not names else [])
    if bad:
        raise ConfideError(f"outputs must be some of {', '.join(allowed)}, got {bad}", where=fn)
    return names


def _integer(fn: str, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfideError(f"{name} must be an integer of at least {low}, got {value!r}", where=fn)
    return value


def logistic_regression_train(
    client: Client,
    *,
    inputs: Mapping[str, str],
    label: str,
    features: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    C: float | None = None,
    max_iter: int | None = None,
    fit_intercept: bool | None = None,
    standardize: bool | None = None,
    outputs: Sequence[str] = TRAIN_OUTPUTS,
    recipients: Sequence[str] | None = None,
    **task: Any,
) -> str:
    """Create a ``logistic-regression-train`` task over `inputs` (input name -> dataset reference;
    their union is the training table) predicting column `label`; returns the task id. `outputs`:
    some of ``model`` (portable JSON) and ``report``, sealed to `recipients` (default: this
    client). Parameters left None take the built-in's defaults (C 1.0, max_iter 100,
    fit_intercept and standardize true). Other keywords go to ``Client.create_task``."""
    if not isinstance(label, str) or not label:
        raise ConfideError("label must be the label column's name", where=TRAIN)
    if features is not None and exclude is not None:
        raise ConfideError("give either features or exclude, not both", where=TRAIN)
    names = _outputs(TRAIN, outputs, TRAIN_OUTPUTS)
    given: dict[str, Any] = {
        "label": label,
        "features": None if features is None else list(features),
        "exclude": None if exclude is None else list(exclude),
        "C": C,
        "max_iter": max_iter,
        "fit_intercept": fit_intercept,
        "standardize": standardize,
    }
    params = {k: v for k, v in given.items() if v is not None}
    to = list(recipients) if recipients is not None else [client.fingerprint]
    return client.create_task(
        function=TRAIN, inputs=inputs, outputs={o: to for o in names}, params=params, **task
    )


def logistic_regression_predict(
    client: Client,
    *,
    model: str,
    data: str,
    label: str | None = None,
    recipients: Sequence[str] | None = None,
    **task: Any,
) -> str:
    """Create a ``logistic-regression-predict`` task: the model (a reference to a dataset holding a
    logistic-regression-train model) scores `data` (a reference to a CSV; column `label`, if
    given, is ignored). Output ``predictions`` is sealed to `recipients` (default: this client);
    the model's owner and the data's owner must approve. Returns the task id."""
    params: dict[str, Any] = {} if label is None else {"label": label}
    to = list(recipients) if recipients is not None else [client.fingerprint]
    return client.create_task(
        function=PREDICT,
        inputs={"model": model, "data": data},
        outputs={"predictions": to},
        params=params,
        **task,
    )


def pca(
    client: Client,
    *,
    inputs: Mapping[str, str],
    n_components: int,
    min_rows: int,
    columns: Sequence[str] | None = None,
    standardize: bool = False,
    outputs: Sequence[str] = ("components",),
    recipients: Sequence[str] | None = None,
    **task: Any,
) -> str:
    """Create a ``pca`` task over the union of `inputs`: `n_components` principal components of
    `columns` (default: every all-numeric column), refused in the enclave on fewer than `min_rows`
    (>= 2) rows. `outputs`: some of ``components`` and ``projected`` (every row's scores: per-row
    values), sealed to `recipients` (default: this client). Returns the task id."""
    names = _outputs(PCA, outputs, PCA_OUTPUTS)
    params: dict[str, Any] = {
        "n_components": _integer(PCA, "n_components", n_components, 1),
        "min_rows": _integer(PCA, "min_rows", min_rows, 2),
    }
    if columns is not None:
        params["columns"] = list(columns)
    if standardize:
        params["standardize"] = True
    to = list(recipients) if recipients is not None else [client.fingerprint]
    return client.create_task(
        function=PCA, inputs=inputs, outputs={o: to for o in names}, params=params, **task
    )


# ---- what an approver reads -------------------------------------------------------------------


def _list(value: Any, clean: Callable[[str], str]) -> str:
    if isinstance(value, list):
        return ", ".join(clean(str(v)) for v in value) or "(none)"
    return f"{clean(repr(value))} (not a list of columns: the enclave will refuse the task)"


def describe(m: Manifest, clean: Callable[[str], str] = str) -> list[str]:
    """Lines for the approval text of a logistic-regression or pca task: what each output releases."""
    fn = m.function
    if fn.kind != "builtin" or fn.name not in (TRAIN, PREDICT, PCA):
        return []
    p = m.params
    to = {o.name: ", ".join(clean(m.name_of(r)) for r in o.recipients) for o in m.outputs}
    inputs = ", ".join(clean(i.name) for i in m.inputs) or "(none)"
    lines = [f"What leaves ({fn.name}, enforced in the enclave):"]
    if fn.name == TRAIN:
        return lines + _describe_train(p, to, inputs, clean)
    if fn.name == PREDICT:
        owners = {i.name: clean(m.name_of(i.owner)) for i in m.inputs}
        ignored = f"; column {clean(str(p['label']))!r} is ignored" if "label" in p else ""
        return [
            *lines,
            f"  the model (input model, of {owners.get('model', '?')}) scores every row of input data "
            f"(of {owners.get('data', '?')}){ignored}; the model's feature columns are read",
            f"  predictions -> {to.get('predictions', '-')}: PER-ROW values: for each data row, in order, "
            "the probability of each class (of the second class when there are two) and the most "
            "likely class; they tell about that row's features and about the model",
            "  the host sees the predictions' size, which tells about how many rows the data has",
        ]
    return lines + _describe_pca(p, to, inputs, clean)


def _describe_train(
    p: Mapping[str, Any], to: Mapping[str, str], inputs: str, clean: Callable[[str], str]
) -> list[str]:
    label = clean(str(p.get("label")))
    if "features" in p:
        feats = f"features {_list(p['features'], clean)}"
    elif "exclude" in p:
        feats = f"every column but the label and {_list(p['exclude'], clean)}"
    else:
        feats = "every column but the label"
    scaled = p.get("standardize", True) is not False
    lines = [
        f"  trained on the union of {inputs}: label {label!r}, {clean(feats)}; C = "
        f"{clean(repr(p.get('C', 1.0)))}, max_iter = {clean(repr(p.get('max_iter', 100)))}"
    ]
    if "model" in to:
        lines.append(
            f"  model -> {to['model']}: per class one coefficient per feature and an intercept"
            + (", and each feature's mean and standard deviation over all training rows" if scaled else "")
            + "; every class name (each distinct label value) leaves as written in the data"
        )
    if "report" in to:
        lines.append(
            f"  report -> {to['report']}: how many rows each input has, how many rows have each class, "
            "the number of iterations and whether it converged"
        )
    lines.append(
        "  no row leaves as such, but a model over few rows, or a rare class, can tell much about "
        "single rows (no cohort threshold applies)"
    )
    return lines


def _describe_pca(
    p: Mapping[str, Any], to: Mapping[str, str], inputs: str, clean: Callable[[str], str]
) -> list[str]:
    cols = (
        f"columns {_list(p['columns'], clean)}"
        if "columns" in p
        else "every column whose cells are all numbers (which columns qualify is released too)"
    )
    scaled = p.get("standardize") is True
    lines = [
        f"  computed on the union of {inputs}: {cols}"
        + (", each scaled to standard deviation 1" if scaled else ""),
        f"  refused unless the inputs have at least min_rows = {clean(repr(p.get('min_rows')))} rows "
        "together (min_rows < 2 is refused)",
    ]
    if "components" in to:
        lines.append(
            f"  components -> {to['components']}: {clean(repr(p.get('n_components')))} components over "
            "those columns, each column's mean"
            + (" and standard deviation" if scaled else "")
            + ", the explained variance and its ratio, and the number of rows"
        )
    if "projected" in to:
        lines.append(
            f"  projected -> {to['projected']}: PER-ROW VALUES: every row's scores on the components, "
            "in row order, one line per row of the inputs; with as many components as columns they "
            "give the rows back; min_rows does not protect them"
        )
    return lines


__all__ = ["describe", "logistic_regression_predict", "logistic_regression_train", "pca"]
