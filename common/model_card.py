"""A model card: what data, privacy, accuracy, size and latency an exported model
has, as data (``model_card.json``) and for people (``MODEL_CARD.md``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

EXPORT_VERSION = 2  # 2: the task, the private evaluation, no public test split needed


@dataclass
class ModelCard:
    """Everything MODEL_CARD.md says, as data (model_card.json)."""

    source_run: str
    created: str
    dataset: str
    label_names: list[str]
    num_sites: int
    rounds_planned: int | None
    rounds_completed: int | None
    partition: str
    dp: bool
    secure_aggregation: bool | None
    epsilon_max: float | None
    delta_max: float | None
    sites: list[dict[str, Any]]
    model: dict[str, Any]
    test_split: dict[str, Any] | None  # None: the task has no public test set
    accuracy: dict[str, float | None]
    size_bytes: dict[str, float]
    latency_ms: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    version: int = EXPORT_VERSION
    task: dict[str, Any] | None = None  # the task's canonical fields
    private_eval: dict[str, Any] | None = None  # the run's last private evaluation
    rehearsal: bool = False  # trained on public stand-in data (a rehearsal), not the sites'

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        acc, size, lat = self.accuracy, self.size_bytes, self.latency_ms
        name = self.task["name"] if self.task else self.dataset
        lines = [f"# Model card: fedsilo {name} classifier", ""]
        if self.rehearsal:
            lines += [
                "> **REHEARSAL.** This model comes from a rehearsal: every site trained on",
                "> public stand-in data, not its own. It says nothing about the sites' data.",
                "",
            ]
        if not self.dp:
            lines += [
                "> **NO DIFFERENTIAL PRIVACY.** This model comes from a baseline run without DP:",
                "> the sites' training examples are NOT protected. Do not release it.",
                "",
            ]
        eps = "-" if self.epsilon_max is None else f"{self.epsilon_max:.3f}"
        delta = "-" if self.delta_max is None else f"{self.delta_max:g}"
        secagg = {True: "on (SecAgg+)", False: "off", None: "unknown"}[self.secure_aggregation]
        lines += [
            "## Training",
            "",
            f"- task: `{name}`, labels (in output order) {', '.join(self.label_names)}"
            + (f"; data set `{self.dataset}`" if self.dataset != name else ""),
            f"- federation: {self.num_sites} sites, partition {self.partition}, "
            f"{self.rounds_completed} of {self.rounds_planned} rounds completed",
            f"- differential privacy: **{'yes' if self.dp else 'NO'}**"
            + (
                f", per site epsilon <= {eps}, delta <= {delta} (this run; privacy unit: one "
                "row of a site's data file)"
                if self.dp
                else ""
            ),
            f"- secure aggregation: {secagg}",
            f"- model: preset `{self.model['preset']}`, {self.model['trainable_parameters']:,} "
            f"trainable of {self.model['parameters']:,} parameters, "
            f"max length {self.model['spec']['max_length']} tokens",
            f"- source run: `{self.source_run}`",
            "",
            "## Privacy spent per site",
            "",
            "The run's epsilon is the PRV accountant's over the run's fixed plan; the lifetime",
            "epsilon is what the site's adaptive privacy filter certifies over every run it ever",
            "ran, against its lifetime budget (docs/threat-model.md).",
            "",
            "| site | run epsilon | lifetime epsilon | delta | lifetime budget |",
            "|---|---|---|---|---|",
        ]
        for s in self.sites:
            lines.append(
                f"| {s['site']} | {_num(s.get('epsilon'), '.3f')} "
                f"| {_num(s.get('lifetime_epsilon'), '.3f')} | {_num(s.get('delta'), 'g')} "
                f"| {_num(s.get('budget'), 'g')} |"
            )
        lines += ["", *_private_section(self.private_eval)]
        split = self.test_split
        where = (
            f"Accuracy on the public test split (`{split['name']}`, {split['examples']:,} "
            f"texts, seed {split['seed']}: the split the coordinator evaluated on). "
            if split is not None
            else "The task has no public test set: no accuracy is measured here (see the "
            "private federated evaluation above). "
        )
        accuracy_row = (
            [
                f"| test accuracy | {acc['fp32']:.4f} | {acc['int8']:.4f} | "
                f"{(acc['int8'] or 0) - (acc['fp32'] or 0):+.4f} |"
            ]
            if acc.get("fp32") is not None and acc.get("int8") is not None
            else []
        )
        lines += [
            "## fp32 and int8",
            "",
            where + "Latency: median of the model's forward pass "
            f"(tokenization excluded), {lat['threads']} torch thread, measured side by side in "
            f"one process on a machine with {lat['cpu_cores']} CPU cores.",
            "",
            "| | fp32 | int8 | int8 / fp32 |",
            "|---|---|---|---|",
            *accuracy_row,
            f"| file size | {size['fp32'] / 2**20:.2f} MiB | {size['int8'] / 2**20:.2f} MiB | "
            f"{size['ratio']:.2f}x |",
            f"| latency, batch of {lat['batch_size']} | {lat['fp32_batch']:.2f} ms | "
            f"{lat['int8_batch']:.2f} ms | {lat['int8_batch'] / lat['fp32_batch']:.2f}x |",
            f"| latency, one text | {lat['fp32_single']:.2f} ms | {lat['int8_single']:.2f} ms | "
            f"{lat['int8_single'] / lat['fp32_single']:.2f}x |",
            "",
        ]
        if acc.get("coordinator") is not None:
            lines += [f"The coordinator reported {acc['coordinator']:.4f} for this model.", ""]
        lines += ["## Intended use", "", *_INTENDED.get(self.dataset, _INTENDED[""]), ""]
        lines += ["## Limitations", "", *_limitations(self), ""]
        lines += ["## Files", ""] + [f"- `{k}`: {v}" for k, v in self.files.items()] + [""]
        return "\n".join(lines)


_INTENDED = {
    "rotten-tomatoes": [
        "Sentiment (fresh / rotten) of short English movie-review snippets, for research",
        "and demonstration of federated DP training. Not for decisions about people.",
    ],
    "20newsgroups": [
        "Topic of English Usenet-style posts among the 20 newsgroups, for research and",
        "demonstration of federated DP training. Not for decisions about people.",
    ],
    "": ["Research and demonstration of federated DP training. Not for decisions about people."],
}


def _limitations(card: ModelCard) -> list[str]:
    out = []
    if card.dp:
        out.append(
            f"- The model is differentially private with respect to each site's individual "
            f"training examples (the privacy unit: one row of a site's data file), at the "
            f"epsilon and delta stated per site (at most {_num(card.epsilon_max, '.3f')}, "
            f"{_num(card.delta_max, 'g')}). A person with k rows at a site is protected as a "
            "group of k: roughly k times epsilon, and delta multiplied by about "
            "k e^((k-1) epsilon); a person at several sites is protected by each site's "
            "guarantee separately, which compose."
        )
    else:
        out.append(
            "- **No differential privacy**: the model may memorise and reveal the sites' "
            "training examples."
        )
    out.append(
        "- The int8 model is computed from the fp32 model alone (post-processing): it costs "
        "no privacy and has the same guarantee."
    )
    if card.secure_aggregation is True:
        out.append(
            "- Secure aggregation hid each site's update from the coordinator during "
            "training; it does not change what the final model reveals."
        )
    out += [
        "- The public parts (MiniLM vocabulary and word embeddings, the public test split) "
        "are not covered by the guarantee. The training settings were chosen with runs "
        "evaluated on this same test split, so its accuracy may be slightly optimistic.",
        f"- Texts are lower-cased and cut to {card.model['spec']['max_length']} WordPiece "
        "tokens; other languages and domains were not evaluated.",
        "- The probabilities are the softmax of the logits and were not calibrated; check "
        "them on held-out data before reading them as confidence.",
        "- Latencies are from one machine, one thread; they indicate the ratio, not a "
        "deployment's speed.",
    ]
    return out


def _private_section(ev: dict[str, Any] | None) -> list[str]:
    """The run's last private federated evaluation, with its noise and its privacy."""
    if ev is None:
        return []
    noise = (
        f"Gaussian noise of standard deviation {ev['noise_std']:.2f} per count of the sum"
        if ev["noise"]
        else "**no noise** (a simulation option: exact counts, no privacy)"
    )
    eps = ", ".join(f"{k} {v:.3f}" for k, v in sorted(ev.get("epsilon_per_site", {}).items()))
    lines = [
        "## Private federated evaluation",
        "",
        f"Each of {len(ev['sites'])} sites evaluated the model on its held-out rows (never "
        f"trained on) and sent its confusion matrix with {noise}"
        + (f"; evaluation epsilon per site: {eps}" if eps else "")
        + ". Scores from the summed (noisy) counts:",
        "",
        f"- accuracy {ev['accuracy']:.4f}, macro-F1 {ev['macro_f1']:.4f} (always predicting "
        f"the majority class: {ev['majority_macro_f1']:.4f})",
        "",
        "| label | precision | recall | F1 | support (noisy) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['label']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} "
        f"| {c['support']} |"
        for c in ev["classes"]
    ]
    return [*lines, ""]


def _num(value: object, fmt: str) -> str:
    return "-" if not isinstance(value, (int, float)) else format(value, fmt)
