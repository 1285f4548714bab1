"""Workflow graphs as data: `config/workflows/<name>.yaml` → a validated `Workflow`.

A workflow names its nodes; each node runs one stage. References between nodes are strings:

    job.input                 the job's input artifact
    demux.audio               output `audio` of node `demux`
    [a.vocals, demux.audio]   (in `inputs`) fallbacks: the first whose node runs for this job

Optional nodes carry `when:` (a condition on the job spec, see `Condition`); fan-out nodes carry
`for_each: target_languages` and become one node per language (`translation-ta`). A node with
`for_each: <node>.<output>` fans out over a list another stage produced (`for_each: chunk.chunks`):
its count is known only when that node completes (`StageCompleted.items`), so until then the plan
holds one pending node under the plain name (never requested, never settled), and afterwards one
node per item, `asr-0`, `asr-1`, … with the param `item`. `when_items: chunk.chunks > 1` makes a
node wait for such a count the same way and run only when the comparison holds (`ItemCondition`). A node that fans out over the same list
and references such a node gets the same item (`alignment-3` <- `asr-3`); a plain node collects
them in item order through `input_lists`. Unlike a language branch, a failed item fails the job. A fan-out node
with `route:` gets its stage per branch from a router (`ROUTERS`): `route: translation` picks the
translation backend for (source language, branch language) from config/translation.yaml, and a
pair no backend serves is a plan error, so the job is refused at submit. A fan-out node
that references another fan-out node gets the same language's branch; a plain node collects all
branches through `input_lists`. `Workflow.expand(spec)` turns the graph into the concrete nodes of
one job (`JobPlan`), which is all the decision function needs.

Nodes are checked against their stage's declaration (captionbus.contracts.stage_specs.STAGES) when a file
loads (`check_stages`): a known stage, the outputs it produces, the inputs it reads, a fan-out
only of a stage that takes `target_language`, and node `params` valid for its params model. A
job's options are checked against the same models at submit (`option_errors`), and every
active node's final params when the job is planned (plan errors).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from captionbus.contracts import JobSpec
from captionbus.contracts.stage_specs import STAGES
from captionbus.core.settings import DEFAULT_CONFIG_DIR, config_files
from captionbus.core.translation_routes import load_routes

JOB = "job"  # the reserved node name of the job itself; `job.input` is its only output
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,40}$")  # no '-': it separates a fan-out branch
# What a node may fan out over, and the parameter each branch receives.
FAN_OUT_SOURCES = {"target_languages": "target_language"}
DEFAULT_WORKFLOWS_DIR = DEFAULT_CONFIG_DIR / "workflows"  # the packaged ones


def _translation_stage(spec: JobSpec, branch: dict[str, str]) -> str:
    return load_routes().route(spec.source_language, branch["target_language"]).stage


def _translation_stages() -> list[str]:
    return list(dict.fromkeys(b.stage for b in load_routes().backends.values()))


# route name -> (stage for one job's branch (raises ValueError when none), every stage it may pick)
ROUTERS = {"translation": (_translation_stage, _translation_stages)}


PLAN_MEMO = 256  # plans Workflow.plan() keeps
_PLANS: dict[tuple, tuple["Workflow", "JobPlan"]] = {}


class WorkflowError(ValueError):
    """A workflow file that cannot be used, with a message that says where and why."""


# ---------------------------------------------------------------- references and conditions


@dataclass(frozen=True)
class Ref:
    """`node.output`; node == JOB for the job input."""

    node: str
    output: str

    @classmethod
    def parse(cls, text: str) -> "Ref":
        if not isinstance(text, str) or text.count(".") != 1:
            raise ValueError(f"reference {text!r} is not of the form node.output (or job.input)")
        node, output = text.split(".")
        if not node or not output:
            raise ValueError(f"reference {text!r} is not of the form node.output (or job.input)")
        if node == JOB and output != "input":
            raise ValueError(f"reference {text!r}: the job has one artifact, job.input")
        return cls(node, output)

    def __str__(self) -> str:
        return f"{self.node}.{self.output}"


_CONDITION_RE = re.compile(
    r"^(?P<negate>not\s+)?(?P<path>(options(\.[A-Za-z0-9_-]+)+)|target_languages|source_language)"
    r"(\s*(?P<op>==|!=)\s*(?P<value>\S.*))?$"
)


@dataclass(frozen=True)
class Condition:
    """`when:` — `options.separate_sources`, `not options.x`, `options.vad == silero`,
    `target_languages` (non-empty), `source_language` (given)."""

    text: str
    path: tuple[str, ...]
    negate: bool = False
    op: str | None = None
    value: Any = None

    @classmethod
    def parse(cls, text: str) -> "Condition":
        match = _CONDITION_RE.match(str(text).strip())
        if not match:
            raise ValueError(
                f"condition {text!r} not understood; use options.<key>, not options.<key>, "
                "options.<key> == <value>, target_languages or source_language"
            )
        value = match["value"]
        if value is not None:
            value = yaml.safe_load(value)  # `== true`, `== 2`, `== silero` read as YAML scalars
        return cls(str(text), tuple(match["path"].split(".")), bool(match["negate"]), match["op"], value)

    def holds(self, spec: JobSpec) -> bool:
        current: Any = {
            "options": spec.options,
            "target_languages": spec.target_languages,
            "source_language": spec.source_language,
        }
        for part in self.path:
            current = current.get(part) if isinstance(current, dict) else None
        if self.op == "==":
            result = current == self.value
        elif self.op == "!=":
            result = current != self.value
        else:
            result = bool(current)
        return result != self.negate


_ITEM_CONDITION_RE = re.compile(r"^(?P<ref>[A-Za-z0-9_]+\.[A-Za-z0-9_]+)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>\d+)$")
_COMPARE = {">": int.__gt__, ">=": int.__ge__, "<": int.__lt__, "<=": int.__le__, "==": int.__eq__, "!=": int.__ne__}


@dataclass(frozen=True)
class ItemCondition:
    """`when_items:` — `chunk.chunks > 1`: a condition on how many items another node listed
    (`StageCompleted.items`), known only once that node completed. The node waits for the
    count (never requested before it) and is skipped when the condition does not hold: the
    `language` node detects once for a job of several chunks, and a job of one chunk detects in
    its one decode (captionbus/services/asr/stage.py handle_chunk), one asr request fewer."""

    text: str
    source: Ref
    op: str
    value: int

    @classmethod
    def parse(cls, text: str) -> "ItemCondition":
        match = _ITEM_CONDITION_RE.match(str(text).strip())
        if not match or match["ref"].split(".")[0] == JOB:
            raise ValueError(f"when_items {text!r} not understood; use <node>.<list output> <op> <count>, "
                             "op one of > >= < <= == != (e.g. chunk.chunks > 1)")
        return cls(str(text), Ref.parse(match["ref"]), match["op"], int(match["value"]))

    def holds(self, count: int) -> bool:
        return _COMPARE[self.op](count, self.value)


# ---------------------------------------------------------------- the file format


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


class NodeSpec(BaseModel):
    """One node of a workflow file."""

    model_config = ConfigDict(extra="forbid")

    stage: str | None = Field(default=None, description="stage to run; defaults to the node name")
    inputs: dict[str, list[str]] = Field(
        default_factory=dict, description="name -> reference, or a list of fallbacks (first that runs)"
    )
    input_lists: dict[str, list[str]] = Field(
        default_factory=dict,
        description="name -> references whose artifacts are all collected (every branch of a fan-out)",
    )
    outputs: list[str] = Field(min_length=1, description="artifact names the stage produces")
    params: dict[str, Any] = Field(default_factory=dict)
    when: str | None = None
    when_items: str | None = Field(
        default=None, description="a condition on the count of another node's list output (chunk.chunks > 1)")
    for_each: str | None = None
    route: str | None = Field(default=None, description="pick the stage per branch (ROUTERS)")
    deadline_s: float | None = Field(default=None, gt=0)
    max_attempts: int | None = Field(default=None, ge=1)
    max_in_flight: int | None = Field(
        default=None, ge=1, description="for_each over items: at most this many of one job's items requested at once")

    @field_validator("inputs", "input_lists", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {name: _as_list(refs) for name, refs in value.items()}
        return value

    @field_validator("when", "when_items")
    @classmethod
    def _conditions(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            (ItemCondition if info.field_name == "when_items" else Condition).parse(value)
        return value

    @field_validator("for_each")
    @classmethod
    def _for_each(cls, value: str | None) -> str | None:
        if value is not None and value not in FAN_OUT_SOURCES:
            try:
                ref = Ref.parse(value)
            except ValueError:
                ref = None
            if ref is None or ref.node == JOB:
                raise ValueError(f"for_each {value!r} unknown; use {', '.join(FAN_OUT_SOURCES)} "
                                 "or a list output of another node (node.output)")
        return value

    def item_source(self) -> Ref | None:
        """The list output this node fans out over (`for_each: chunk.chunks`), if it does."""
        if self.for_each is None or self.for_each in FAN_OUT_SOURCES:
            return None
        return Ref.parse(self.for_each)

    @field_validator("route")
    @classmethod
    def _route(cls, value: str | None) -> str | None:
        if value is not None and value not in ROUTERS:
            raise ValueError(f"route {value!r} unknown; known: {', '.join(ROUTERS)}")
        return value

    @model_validator(mode="after")
    def _has_inputs(self) -> "NodeSpec":
        if self.route and not self.for_each:
            raise ValueError("route picks a stage per branch: the node needs for_each")
        if self.route and self.item_source() is not None:
            raise ValueError("route picks a stage per target language: not with for_each over items")
        if not self.inputs and not self.input_lists:
            raise ValueError("a node needs inputs (at least job.input)")
        for name, refs in {**self.inputs, **self.input_lists}.items():
            if not refs:
                raise ValueError(f"input {name!r} has no reference")
            for ref in refs:
                Ref.parse(ref)
        return self

    def stage_name(self, node: str) -> str:
        return self.stage or node

    def possible_stages(self, node: str) -> list[str]:
        """Every stage this node may run (a routed node: each its router can pick)."""
        if self.route:
            return ROUTERS[self.route][1]()
        return [self.stage_name(node)]

    def condition(self) -> Condition | None:
        return Condition.parse(self.when) if self.when else None

    def item_condition(self) -> ItemCondition | None:
        return ItemCondition.parse(self.when_items) if self.when_items else None

    def waits_for(self) -> Ref | None:
        """The list this node needs the count of before it is planned: the one it fans out over,
        else the one its `when_items` reads."""
        source = self.item_source()
        if source is None and self.when_items:
            source = self.item_condition().source
        return source


class Workflow(BaseModel):
    """A validated workflow graph. Build with `load_workflow` / `Workflow.from_dict`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NODE_NAME_RE.pattern)
    description: str = ""
    nodes: dict[str, NodeSpec] = Field(min_length=1)
    outputs: dict[str, str | list[str]] = Field(
        default_factory=dict, description="job output name -> reference, or [fallback, ...]: the first whose node runs")

    @model_validator(mode="after")
    def _check_graph(self) -> "Workflow":
        for name in self.nodes:
            if name == JOB or not NODE_NAME_RE.match(name):
                raise ValueError(f"node name {name!r}: use letters, digits and '_' (not 'job')")
        for name, node in self.nodes.items():
            for kind, table in (("inputs", node.inputs), ("input_lists", node.input_lists)):
                for input_name, refs in table.items():
                    for text in refs:
                        self._check_ref(f"node {name} {kind}.{input_name}", Ref.parse(text))
                        if kind == "inputs":
                            self._check_branch(name, input_name, Ref.parse(text))
            for key, source in (("for_each", node.item_source()),
                                ("when_items", node.item_condition() and node.item_condition().source)):
                if source is not None:
                    self._check_ref(f"node {name} {key}", source)
                    if self.nodes[source.node].for_each:
                        raise ValueError(f"node {name} {key} {source}: {source.node} is itself a fan-out node")
        for output_name, texts in self.outputs.items():
            for text in [texts] if isinstance(texts, str) else texts:
                try:
                    ref = Ref.parse(text)
                except ValueError as e:
                    raise ValueError(f"outputs.{output_name}: {e}") from None
                self._check_ref(f"outputs.{output_name}", ref)
        self.topological_order()  # raises on a cycle
        return self

    def _check_ref(self, where: str, ref: Ref) -> None:
        if ref.node == JOB:
            return
        if ref.node not in self.nodes:
            raise ValueError(
                f"{where} refers to unknown node {ref.node!r} (nodes: {', '.join(self.nodes)})"
            )
        declared = self.nodes[ref.node].outputs
        if ref.output not in declared:
            raise ValueError(
                f"{where} refers to {ref}, but {ref.node} declares outputs [{', '.join(declared)}]"
            )

    def _check_branch(self, name: str, input_name: str, ref: Ref) -> None:
        if ref.node == JOB:
            return
        source, target = self.nodes[ref.node], self.nodes[name]
        if source.for_each and source.for_each != target.for_each:
            raise ValueError(
                f"node {name} inputs.{input_name} takes {ref} from fan-out node {ref.node}: "
                "one artifact cannot come from many branches; collect them with input_lists"
            )

    def dependencies(self, name: str) -> list[str]:
        node = self.nodes[name]
        refs = [r for refs in (*node.inputs.values(), *node.input_lists.values()) for r in refs]
        nodes = [Ref.parse(r).node for r in refs] + ([source.node] if (source := node.waits_for()) else [])
        return list(dict.fromkeys(n for n in nodes if n != JOB))

    def topological_order(self) -> list[str]:
        """Node names, dependencies first (file order among equals). Raises on a cycle."""
        order: list[str] = []
        state: dict[str, str] = {}  # "visiting" | "done"

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                cycle = path[path.index(name):] + [name]
                raise ValueError(f"workflow {self.name} has a cycle: {' -> '.join(cycle)}")
            state[name] = "visiting"
            for dep in self.dependencies(name):
                visit(dep, path + [name])
            state[name] = "done"
            order.append(name)

        for name in self.nodes:
            visit(name, [])
        return order

    @classmethod
    def from_dict(cls, data: Any, source: str = "<workflow>") -> "Workflow":
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise WorkflowError(f"{source}: {_readable(e)}") from None

    def expand(self, spec: JobSpec, items: dict[str, int] | None = None) -> "JobPlan":
        """The job's concrete nodes; `items` maps `node.output` to the count of items that
        completed node listed (JobState.item_counts()), for nodes that fan out over them."""
        return _expand(self, spec, items or {})

    def plan(self, spec: JobSpec, items: dict[str, int] | None = None) -> "JobPlan":
        """`expand`, remembered: the same (spec, items) gives the same plan object, which the
        caller must only read (captionbus.coordinator.decide does). A plan depends on nothing else, so the
        memo cannot change what decide() returns; it removes the cost decide() paid on every
        event: expanding a 2-hour film's 240 chunk nodes, each params model validated, took
        43 ms, and a film's 246 events paid it each time (measured with benchmarks/fleet_sim.py's
        chunked workflow on the 2-core machine). A plan changes only when a fan-out's count
        becomes known, so a job expands about twice. PLAN_MEMO plans are kept (least recently
        used out): a 240-chunk plan is a few hundred KB."""
        key = (id(self), spec.model_dump_json(), tuple(sorted((items or {}).items())))
        memo = _PLANS
        found = memo.pop(key, None)
        # The workflow is kept with its plan, so its id cannot be another workflow's meanwhile.
        plan = found[1] if found is not None and found[0] is self else _expand(self, spec, items or {})
        while len(memo) >= PLAN_MEMO:
            memo.pop(next(iter(memo)))
        memo[key] = (self, plan)  # most recently used last
        return plan


def _readable(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (a typo?)"
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def load_workflow(path: str | Path) -> Workflow:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise WorkflowError(f"{path}: cannot read: {e}") from None
    workflow = Workflow.from_dict(data, str(path))
    if workflow.name != path.stem:
        raise WorkflowError(f"{path}: name {workflow.name!r} must match the file name {path.stem!r}")
    check_stages(workflow, str(path))
    return workflow


def check_stages(workflow: Workflow, source: str = "<workflow>") -> None:
    """Each node against the declaration of every stage it may run (WorkflowError naming the
    file and node): the stage exists, produces the node's outputs, reads its inputs (and gets
    the ones it needs), takes `target_language` when the node fans out, accepts its params."""
    problems = []
    for name, node in workflow.nodes.items():
        checked: set[type] = set()  # a routed node's stages may share one params model: say it once
        for stage in node.possible_stages(name):
            problems += [f"node {name}: {p}" for p in _stage_problems(node, stage, checked)]
    problems += _item_problems(workflow)
    if problems:
        raise WorkflowError(f"{source}: {'; '.join(dict.fromkeys(problems))}")


def _stage_problems(node: NodeSpec, stage: str, checked: set[type]) -> list[str]:
    spec = STAGES.get(stage)
    if spec is None:
        return [f"unknown stage {stage!r} (stages: {', '.join(STAGES)})"]
    problems = []
    if not spec.passthrough:
        extra = [o for o in node.outputs if o not in spec.outputs]
        if extra:
            problems.append(f"stage {stage} does not produce {', '.join(extra)} (its outputs: {', '.join(spec.outputs)})")
        readable = (*spec.inputs, *spec.optional_inputs)
        for kind, given, known, needed in (("input", node.inputs, readable, spec.inputs),
                                           ("input list", node.input_lists, spec.input_lists, spec.input_lists)):
            unknown = [n for n in given if n not in known]
            if unknown:
                problems.append(f"stage {stage} reads no {kind} {', '.join(unknown)} "
                                f"(its {kind}s: {', '.join(known) or 'none'})")
            missing = [n for n in needed if n not in given]
            if missing:
                problems.append(f"stage {stage} needs {kind} {', '.join(missing)}")
    source = node.item_source()
    if source is not None and not spec.fans_out_items:
        problems.append(f"stage {stage} cannot run per item of {source}: it takes no item param")
    elif node.for_each and source is None and not spec.fans_out:
        problems.append(f"stage {stage} cannot run per {FAN_OUT_SOURCES[node.for_each]}: it takes no such param")
    error = spec.check_params(node.params) if spec.params not in checked else None
    checked.add(spec.params)
    if error:
        problems.append(f"params: {error}")
    return problems


def _item_problems(workflow: Workflow) -> list[str]:
    """`for_each: node.output` and `when_items: node.output ...` must name an output the node's
    stage declares as a list."""
    problems = []
    for name, node in workflow.nodes.items():
        for key, source in (("for_each", node.item_source()),
                            ("when_items", node.item_condition() and node.item_condition().source)):
            if source is None:
                continue
            producer = workflow.nodes[source.node]
            for stage in producer.possible_stages(source.node):
                spec = STAGES.get(stage)
                if spec is not None and source.output not in spec.item_outputs:
                    problems.append(f"node {name}: {key} {source}: stage {stage} does not list items in "
                                    f"{source.output!r} (its list outputs: {', '.join(spec.item_outputs) or 'none'})")
    return problems


def option_errors(workflow: Workflow, spec: JobSpec) -> list[str]:
    """The job's options checked against the stages they reach, before anything runs.

    `options[KEY]` as a mapping is a group of stage params (`-o KEY.param=value`); KEY must be a
    node of the workflow, a branch of a fan-out node for one of this job's items
    (`translation-ta`) or a stage one of its nodes runs, and each group, over the node's own
    params, must fit the params model of every stage it reaches. Any other KEY must be a switch
    the workflow's `when:` conditions read (`separate_sources`, `vad`)."""
    switches = {c.path[1] for n in workflow.nodes.values() if (c := n.condition()) and c.path[0] == "options"}
    errors = []
    for key, value in spec.options.items():
        targets = _option_targets(workflow, spec, key)
        if isinstance(targets, str):
            if key in switches:
                continue
            errors.append(targets)
            continue
        if not isinstance(value, dict):
            if key not in switches:
                errors.append(f"option {key}={value!r}: stage options are {key}.KEY=VALUE")
            continue
        checked: set[tuple[str, type]] = set()
        for name, stage in targets:
            if (name, STAGES[stage].params) in checked:
                continue  # a routed node's stages may share one params model: say it once
            checked.add((name, STAGES[stage].params))
            error = STAGES[stage].check_params({**workflow.nodes[name].params, **value})
            if error:
                errors.append(f"option {key}: {error}")
    return list(dict.fromkeys(errors))


def _option_targets(workflow: Workflow, spec: JobSpec, key: str) -> list[tuple[str, str]] | str:
    """(node, stage) pairs a job option group reaches, or why it reaches none."""
    nodes = workflow.nodes
    if key in nodes:
        return [(key, stage) for stage in nodes[key].possible_stages(key) if stage in STAGES]
    name, dash, item = key.partition("-")
    if dash and name in nodes and nodes[name].for_each in FAN_OUT_SOURCES:
        items = list(getattr(spec, nodes[name].for_each))
        if item not in items:
            return (f"option {key}: {item!r} is not one of this job's {nodes[name].for_each} "
                    f"({', '.join(items) or 'none'})")
        return [(name, stage) for stage in nodes[name].possible_stages(name) if stage in STAGES]
    reached = [(n, key) for n, node in nodes.items() if key in node.possible_stages(n)]
    if reached and key in STAGES:
        return reached
    valid = list(dict.fromkeys([*nodes, *(s for n, node in nodes.items() for s in node.possible_stages(n))]))
    # per target language only: an item's node (asr-3) takes the options of its node (asr)
    branches = [f"{n}-<{FAN_OUT_SOURCES[node.for_each]}>" for n, node in nodes.items() if node.for_each in FAN_OUT_SOURCES]
    return (f"option {key}: workflow {workflow.name} has no stage or node {key!r} "
            f"(valid: {', '.join(valid + branches)})")


def load_workflows(directory: str | Path | None = None) -> dict[str, Workflow]:
    """Every `*.yaml` in `directory`, by name; by default the packaged workflows plus the user's
    (CAPTIONBUS_CONFIG/workflows, a file there replaces the packaged one of the same name).
    One bad file fails the lot, loudly."""
    paths = sorted(Path(directory).glob("*.yaml")) if directory is not None else config_files("workflows").values()
    return {wf.name: wf for wf in map(load_workflow, paths)}


# ---------------------------------------------------------------- one job's concrete nodes


@dataclass(frozen=True)
class Source:
    """Where one input artifact comes from in a job: a node id's output, or the job input."""

    node_id: str | None  # None: the job input
    output: str


@dataclass
class PlannedNode:
    id: str  # "asr", or "translation-ta" for a fan-out branch
    name: str  # the workflow node
    stage: str
    active: bool  # False: its `when` is off for this job (state: skipped)
    branch: dict[str, str] = field(default_factory=dict)  # e.g. {"target_language": "ta"}
    inputs: dict[str, Source] = field(default_factory=dict)
    input_lists: dict[str, list[Source]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    deadline_s: float | None = None
    max_attempts: int | None = None
    item: int | None = None  # for_each over a list output: this node's item
    # for_each over a list whose count is not known yet: a stand-in, never requested; also a
    # node whose when_items reads a count not known yet
    pending_items: bool = False
    after: list[str] = field(default_factory=list)  # the node whose list this one fans out over or counts
    max_in_flight: int | None = None  # of this node's items at once (the NodeSpec's)

    @property
    def depends_on(self) -> list[str]:
        sources = [*self.inputs.values(), *(s for lst in self.input_lists.values() for s in lst)]
        return list(dict.fromkeys([*(s.node_id for s in sources if s.node_id is not None), *self.after]))


@dataclass
class JobPlan:
    workflow: str
    nodes: dict[str, PlannedNode]  # dependencies first
    outputs: dict[str, Source]
    errors: list[str]  # why this job cannot run (e.g. an input none of whose sources runs)

    def active(self) -> list[PlannedNode]:
        return [n for n in self.nodes.values() if n.active]

    def stages(self) -> list[str]:
        """Stages this job will run, in order, without repeats (to check their environments)."""
        return list(dict.fromkeys(n.stage for n in self.active()))


def _branch_ids(workflow: Workflow, spec: JobSpec, name: str) -> list[tuple[str, dict[str, str]]]:
    node = workflow.nodes[name]
    if not node.for_each or node.item_source() is not None:
        return [(name, {})]
    items = getattr(spec, node.for_each)
    param = FAN_OUT_SOURCES[node.for_each]
    return [(f"{name}-{item}", {param: item}) for item in dict.fromkeys(items)]


def _item_ids(
    workflow: Workflow, name: str, items: dict[str, int], nodes: dict[str, PlannedNode]
) -> list[tuple[str, int | None]] | str:
    """(node id, item) per item of the list a node fans out over; one pending stand-in
    `(name, None)` while the count is unknown; a plan error when the list's node does not run."""
    source = workflow.nodes[name].item_source()
    if not nodes[source.node].active:
        return f"{name} fans out over {source}, and {source.node} does not run for this job"
    count = items.get(str(source))
    if count is None:
        return [(name, None)]
    return [(f"{name}-{i}", i) for i in range(count)]


def _expand(workflow: Workflow, spec: JobSpec, items: dict[str, int]) -> JobPlan:
    nodes: dict[str, PlannedNode] = {}
    ids_of: dict[str, list[str]] = {}
    errors: list[str] = []

    def candidates(ref: Ref, branch_of: str | None, item_of: tuple[str, int | None] | None) -> list[Source]:
        """Sources a reference stands for: one for a plain, same-branch or same-item node, all
        branches (or items) else."""
        if ref.node == JOB:
            return [Source(None, "input")]
        source = workflow.nodes[ref.node]
        if item_of is not None and source.for_each == item_of[0]:
            ids = [ref.node if item_of[1] is None else f"{ref.node}-{item_of[1]}"]
        elif branch_of is not None and source.for_each and source.item_source() is None:
            ids = [f"{ref.node}-{branch_of}"]
        else:
            ids = ids_of[ref.node]
        return [Source(i, ref.output) for i in ids if i in nodes and nodes[i].active]

    for name in workflow.topological_order():
        spec_node = workflow.nodes[name]
        condition = spec_node.condition()
        active = condition.holds(spec) if condition else True
        counting = spec_node.item_condition()
        awaits_count = False  # when_items over a count not known yet: wait for it, never requested
        if active and counting is not None:
            if not nodes[counting.source.node].active:
                errors.append(f"{name} reads the count of {counting.source} (when_items), and "
                              f"{counting.source.node} does not run for this job")
            elif (count := items.get(str(counting.source))) is None:
                awaits_count = True
            else:
                active = counting.holds(count)
        ids_of[name] = []
        if spec_node.item_source() is not None:
            found_items = _item_ids(workflow, name, items, nodes) if active else [(name, None)]
            if isinstance(found_items, str):
                errors.append(found_items)
                found_items = [(name, None)]
            branches = [(node_id, {}, item) for node_id, item in found_items]
        else:
            branches = [(node_id, branch, None) for node_id, branch in _branch_ids(workflow, spec, name)]
        for node_id, branch, item in branches:
            ids_of[name].append(node_id)
            branch_item = next(iter(branch.values()), None)
            source = spec_node.item_source()
            item_of = (spec_node.for_each, item) if source is not None else None
            stage = spec_node.stage_name(name)
            if active and spec_node.route:
                try:
                    stage = ROUTERS[spec_node.route][0](spec, branch)
                except ValueError as e:
                    errors.append(f"{node_id}: {e}")
            planned = PlannedNode(
                id=node_id, name=name, stage=stage, active=active, branch=branch,
                deadline_s=spec_node.deadline_s, max_attempts=spec_node.max_attempts, item=item,
                pending_items=(source is not None and item is None) or awaits_count,
                after=[waits.node] if (waits := spec_node.waits_for()) is not None else [],
                max_in_flight=spec_node.max_in_flight,
            )
            nodes[node_id] = planned
            if not active:
                continue
            optional = STAGES[stage].optional_inputs if stage in STAGES else ()
            for input_name, refs in spec_node.inputs.items():
                found = [s for r in refs for s in candidates(Ref.parse(r), branch_item, item_of)]
                if found:
                    planned.inputs[input_name] = found[0]
                elif input_name in optional:
                    continue  # e.g. transcript_join's turns when no diarization node runs for this job
                else:
                    errors.append(
                        f"{node_id} needs input {input_name!r} from {' or '.join(refs)}, "
                        "and none of those stages runs for this job"
                    )
            for input_name, refs in spec_node.input_lists.items():
                planned.input_lists[input_name] = [
                    s for r in refs for s in candidates(Ref.parse(r), branch_item, item_of)
                ]
            planned.params = _params(spec_node, name, node_id, planned.stage, spec, branch)
            if item is not None:
                planned.params["item"] = item
            stage_spec = STAGES.get(planned.stage)
            if stage_spec is not None and (error := stage_spec.check_params(planned.params)):
                errors.append(f"{node_id}: {error}")

    outputs: dict[str, Source] = {}
    for output_name, texts in workflow.outputs.items():
        for text in [texts] if isinstance(texts, str) else texts:  # a list: the first whose node runs
            ref = Ref.parse(text)
            if ref.node == JOB:
                outputs[output_name] = Source(None, "input")
                break
            fan_out = bool(workflow.nodes[ref.node].for_each)
            active = [node_id for node_id in ids_of[ref.node] if nodes[node_id].active]
            for node_id in active:
                suffix = node_id[len(ref.node):] if fan_out else ""  # "srt-ta" for a branch
                outputs[f"{output_name}{suffix}"] = Source(node_id, ref.output)
            if active:
                break
    return JobPlan(workflow.name, nodes, outputs, errors)


def _params(
    node: NodeSpec, name: str, node_id: str, stage: str, spec: JobSpec, branch: dict[str, str]
) -> dict[str, Any]:
    """Graph params < job languages < the job's options for this stage, then node, then branch
    node (`-o translation-ta.glossary=...` for one language only) < the branch parameter."""
    params: dict[str, Any] = dict(node.params)
    params["source_language"] = spec.source_language
    params["target_languages"] = list(spec.target_languages)
    for key in dict.fromkeys((stage, name, node_id)):
        if isinstance(spec.options.get(key), dict):
            params.update(spec.options[key])
    params.update(branch)
    return params
