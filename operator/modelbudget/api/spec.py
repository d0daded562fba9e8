"""The ModelBudget spec: what the owner of a model-serving Deployment asks of the operator.

Field names are snake_case in Python and camelCase on the wire (``by_alias``); the CRD's
OpenAPI schema is generated from these classes (``modelbudget crd``), so a description or a
bound written here is what ``kubectl explain`` shows and what the apiserver enforces.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from modelbudget.api.rules import CrossFieldRule, RuleCheckedModel, cross_field_rules

GROUP = "modelbudget.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelBudget"
PLURAL = "modelbudgets"

Name = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]
PromQL = Annotated[str, Field(min_length=1, max_length=4096)]


class ApiModel(RuleCheckedModel):
    """Base of every spec/status model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=False,
    )


class Mode(StrEnum):
    ENFORCE = "Enforce"
    RECOMMEND = "Recommend"


class Period(StrEnum):
    HOUR = "Hour"
    DAY = "Day"
    MONTH = "Month"


class CapacityType(StrEnum):
    SPOT = "Spot"
    ON_DEMAND = "OnDemand"


class PriceSource(StrEnum):
    SPEC = "Spec"
    OPEN_COST = "OpenCost"


class Headroom(StrEnum):
    """Where the forecast's headroom goes."""

    AUTO = "Auto"
    REPLICAS = "Replicas"
    CAPACITY_BUFFER = "CapacityBuffer"


class FallbackAction(StrEnum):
    HOLD = "Hold"
    SCALE_TO = "ScaleTo"


class TargetRef(ApiModel):
    """The workload serving the model; scaled through its ``/scale`` subresource."""

    api_version: Literal["apps/v1"] = "apps/v1"
    kind: Literal["Deployment"] = "Deployment"
    name: Name


class CurveSample(ApiModel):
    tokens: float = Field(gt=0, description="Tokens per request (the limit) at which performance was measured.")
    performance: float = Field(description="Measured performance (score, usually in [0, 1]).")


@cross_field_rules(
    CrossFieldRule(
        cel="self.minTokens < self.maxTokens",
        message="curve.minTokens must be less than curve.maxTokens",
        check=lambda c: c.min_tokens < c.max_tokens,
    ),
    CrossFieldRule(
        cel="has(self.slope) == has(self.intercept)",
        message="curve.intercept and curve.slope must be given together",
        check=lambda c: (c.slope is None) == (c.intercept is None),
    ),
    CrossFieldRule(
        cel="has(self.slope) != has(self.samples)",
        message="curve needs either intercept and slope, or samples to fit (not both)",
        check=lambda c: (c.slope is None) != (c.samples is None),
    ),
)
class Curve(ApiModel):
    """Token-performance curve ``perf(t) = intercept + slope * ln(t)`` on ``[minTokens, maxTokens]``."""

    intercept: float | None = Field(default=None, ge=-1000, le=1000, description="a in a + b*ln(t).")
    slope: float | None = Field(
        default=None, gt=0, le=1000, description="b in a + b*ln(t): performance gained per e-fold of tokens."
    )
    samples: list[CurveSample] | None = Field(
        default=None,
        min_length=3,
        max_length=256,
        description="Measured (tokens, performance) points; the operator fits intercept and slope itself.",
    )
    min_tokens: int = Field(ge=1, le=10_000_000, description="Smallest token limit the curve is valid for.")
    max_tokens: int = Field(ge=1, le=10_000_000, description="Largest token limit the curve is valid for.")


class Ceiling(ApiModel):
    amount: float = Field(gt=0, le=1e9, description="Dollar ceiling for one period.")
    currency: Literal["USD"] = "USD"
    period: Period = Field(
        default=Period.HOUR,
        description="Hour: a hard cap on the hourly spend rate. Day/Month: a budget for the calendar "
        "period (UTC), paced so that it lasts until the period ends.",
    )


@cross_field_rules(
    CrossFieldRule(
        cel="has(self.valuePerPoint) != has(self.minGainPerDollar)",
        message="budget needs exactly one of valuePerPoint or minGainPerDollar",
        check=lambda b: (b.value_per_point is None) != (b.min_gain_per_dollar is None),
    ),
)
class Budget(ApiModel):
    ceiling: Ceiling
    value_per_point: float | None = Field(
        default=None,
        gt=0,
        le=1e6,
        description="Dollars one performance point is worth on one request. Tokens are added while the "
        "performance they buy is worth more than they cost.",
    )
    min_gain_per_dollar: float | None = Field(
        default=None,
        gt=0,
        le=1e9,
        description="Alternative to valuePerPoint: the least performance (points summed over requests) "
        "one extra dollar must buy. Equivalent to valuePerPoint = 1 / minGainPerDollar.",
    )
    burst_factor: float = Field(
        default=1.5,
        ge=1,
        le=10,
        description="Day/Month ceilings: how far above the even pace (remaining budget / remaining "
        "time, and at most the ceiling / the period) the hourly rate may go.",
    )

    @property
    def value_of_point(self) -> float:
        """Dollars per performance point per request, whichever way the owner stated it."""
        if self.value_per_point is not None:
            return self.value_per_point
        assert self.min_gain_per_dollar is not None  # guaranteed by the cross-field rule
        return 1.0 / self.min_gain_per_dollar


class ProviderKind(StrEnum):
    KARPENTER_NODE_POOL = "NodePool"
    MACHINE_DEPLOYMENT = "MachineDeployment"
    KWOK_NODE_POOL = "KwokNodePool"


@cross_field_rules(
    CrossFieldRule(
        cel="!has(self.namespace) || self.kind == 'MachineDeployment'",
        message="providerRef.namespace is only for a MachineDeployment (NodePool and KwokNodePool are cluster-scoped)",
        check=lambda r: r.namespace is None or r.kind is ProviderKind.MACHINE_DEPLOYMENT,
    ),
)
class ProviderRef(ApiModel):
    """The object that sizes this pool in the cluster.

    ``NodePool`` (karpenter.sh): the operator sets ``spec.limits["nvidia.com/gpu"]`` (a static
    NodePool: ``spec.replicas``).
    ``MachineDeployment`` (cluster.x-k8s.io): the operator sets ``spec.replicas``.
    ``KwokNodePool`` (testbed.modelbudget.dev): the local testbed's pool, ``spec.replicas``.
    """

    kind: ProviderKind
    name: Name
    namespace: Name | None = Field(
        default=None,
        description="MachineDeployment only, and only the ModelBudget's own namespace (the default): "
        "a provider object in another namespace is refused (PoolNotAllowed).",
    )


class Serving(ApiModel):
    """How one replica on this pool serves, in vLLM's terms (continuous batching).

    Per-sequence inter-token latency at batch ``b`` is ``decodeAlphaSeconds + decodeBetaSeconds * b``
    (the llm-d variant autoscaler's model); ``b`` is at most ``maxNumSeqs`` (vLLM's
    ``--max-num-seqs``). A prompt costs ``promptTokens / prefillTokensPerSecond`` before its first
    token. Unset fields take the defaults in docs/serving.md; ``decodeBetaSeconds`` defaults to
    the value that makes a full batch deliver ``tokensPerSecondPerReplica``.
    """

    max_num_seqs: int = Field(default=256, ge=1, le=65_536, description="Most sequences in one replica's batch.")
    decode_alpha_seconds: float = Field(
        default=0.02, gt=0, le=10, description="Inter-token latency of a lone sequence, seconds."
    )
    decode_beta_seconds: float | None = Field(
        default=None, ge=0, le=10, description="Inter-token latency added per sequence in the batch, seconds."
    )
    prefill_tokens_per_second: float = Field(
        default=10_000, gt=0, le=1e8, description="Prompt tokens per second one replica prefills."
    )


class GpuOffering(ApiModel):
    """What a pool of GPU nodes is: its GPU, its price, its node shape and its bounds (inline in a
    ModelBudget's ``nodePools``, or declared by the cluster admin as a GpuPool)."""

    gpu_type: str = Field(min_length=1, max_length=63, description="e.g. nvidia-a100-80gb.")
    price_per_gpu_hour: float = Field(gt=0, le=10_000, description="Dollars per GPU-hour.")
    capacity_type: CapacityType = CapacityType.ON_DEMAND
    gpus_per_node: int = Field(ge=1, le=64)
    min_nodes: int = Field(default=0, ge=0, le=10_000)
    max_nodes: int = Field(ge=0, le=10_000)


@cross_field_rules(
    CrossFieldRule(
        cel="self.minNodes <= self.maxNodes",
        message="nodePools[].minNodes must not exceed maxNodes",
        check=lambda p: p.min_nodes <= p.max_nodes,
    ),
)
class NodePool(GpuOffering):
    """One GPU offering: a price, a shape and a throughput, as data (the planner does the arithmetic)."""

    name: Name
    tokens_per_second_per_replica: float = Field(
        gt=0,
        le=1e7,
        description="Generated tokens/s one replica sustains on this pool at target utilisation.",
    )
    node_selector: dict[str, str] | None = Field(
        default=None,
        max_length=16,
        description="Labels that identify this pool's nodes (default: modelbudget.dev/pool=<name>).",
    )
    provider_ref: ProviderRef | None = Field(
        default=None, description="What resizes the pool; without it the pool is observed but never resized."
    )
    serving: Serving = Field(
        default_factory=lambda: Serving(),
        description="How one replica serves here: batch size, decode and prefill speed.",
    )


class SharedPool(ApiModel):
    """A GpuPool (cluster-scoped, declared by the cluster admin) this ModelBudget draws from.

    Price, node shape and bounds come from the GpuPool; the operator grants GPUs on it and
    bills this ModelBudget its share of the pool's bill (docs/pools.md).
    """

    pool: Name = Field(description="The GpuPool's name.")
    tokens_per_second_per_replica: float = Field(
        gt=0,
        le=1e7,
        description="Generated tokens/s one replica of this model sustains on the pool at target utilisation.",
    )
    serving: Serving = Field(
        default_factory=lambda: Serving(),
        description="How one replica of this model serves on the pool (continuous batching), as on nodePools[].",
    )


@cross_field_rules(
    CrossFieldRule(
        cel="self.min <= self.max",
        message="replicas.min must not exceed replicas.max",
        check=lambda r: r.min <= r.max,
    ),
)
class Replicas(ApiModel):
    min: int = Field(default=1, ge=0, le=100_000)
    max: int = Field(ge=0, le=100_000)
    gpus_per_replica: int = Field(default=1, ge=1, le=64)


@cross_field_rules(
    CrossFieldRule(
        # Written with the defaults spelled out, so the rule holds on a manifest before defaulting too.
        cel="(has(self.weightsKey) ? self.weightsKey : 'weights') != (has(self.key) ? self.key : 'max_tokens') "
        "&& (has(self.weightsKey) ? self.weightsKey : 'weights') != 'admitted_rps_per_pod'",
        message="tokenLimits.publish.configMap.weightsKey must differ from key and from admitted_rps_per_pod",
        check=lambda c: c.weights_key not in (c.key, "admitted_rps_per_pod"),
    ),
)
class ConfigMapTarget(ApiModel):
    name: Name | None = Field(default=None, description="Default: <targetRef.name>-token-limit.")
    key: str = Field(default="max_tokens", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    weights_key: str = Field(
        default="weights",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="With variants: the key holding each variant's traffic share as JSON "
        '{"<variant>": <percent>}, for the gate or any other router to read.',
    )


class TokenLimitPublish(ApiModel):
    """Where the per-request token limit is published for the model server (or its gateway) to read."""

    config_map: ConfigMapTarget = Field(default_factory=ConfigMapTarget)
    pod_template_annotation: bool = Field(
        default=False,
        description="Also set annotation modelbudget.dev/max-tokens on the pod template. Changing it "
        "rolls the Deployment, so it is off by default.",
    )


@cross_field_rules(
    CrossFieldRule(
        cel="!has(self.min) || !has(self.max) || self.min <= self.max",
        message="tokenLimits.min must not exceed tokenLimits.max",
        check=lambda t: t.min is None or t.max is None or t.min <= t.max,
    ),
)
class TokenLimits(ApiModel):
    min: int | None = Field(default=None, ge=1, le=10_000_000, description="Default: curve.minTokens.")
    max: int | None = Field(default=None, ge=1, le=10_000_000, description="Default: curve.maxTokens.")
    max_step_up_factor: float = Field(
        default=2.0, ge=1.0, le=100, description="The limit rises at most this factor per reconcile."
    )
    publish: TokenLimitPublish = Field(default_factory=TokenLimitPublish)
    enforcement_grace_seconds: float = Field(
        default=30,
        ge=1,
        le=3600,
        description="How long the gates may take to apply a published limit before TokenLimitEnforced "
        "turns False (reason Stale) with a Warning Event.",
    )


class SecretKeyRef(ApiModel):
    name: Name
    key: str = Field(min_length=1, max_length=253)


class PrometheusAuth(ApiModel):
    bearer_token_secret_ref: SecretKeyRef | None = None
    basic_auth_secret_ref: Name | None = Field(
        default=None, description="A Secret with keys 'username' and 'password'."
    )


DEFAULT_SELECTOR = 'namespace="$namespace"'


GATE_SELECTOR = 'namespace="$namespace",target="$target"'


class Queries(ApiModel):
    """PromQL for each observed quantity. ``$selector``, ``$window``, ``$namespace`` and ``$target``
    (the Deployment's name) are substituted.

    Defaults follow vLLM's metric names and the gate's (``modelbudget gate``); any server exporting
    the same series works.
    """

    gate_arrival_rate: PromQL = Field(
        default=f"sum(rate(modelbudget_gate_arrivals_total{{{GATE_SELECTOR}}}[$window]))",
        description="Requests/s arriving at the gates: the demand, when gate series exist "
        "(else requestRate, which counts completions).",
    )
    gate_token_limits: PromQL = Field(
        default=f"modelbudget_gate_token_limit{{{GATE_SELECTOR}}}",
        description="The token limit each gate applies now, one series per gate (not aggregated).",
    )
    request_rate: PromQL = "sum(rate(vllm:request_success_total{$selector}[$window]))"
    truncated_request_rate: PromQL = (
        'sum(rate(vllm:request_success_total{$selector,finished_reason="length"}[$window]))'
    )
    prompt_tokens_rate: PromQL = "sum(rate(vllm:prompt_tokens_total{$selector}[$window]))"
    generation_tokens_rate: PromQL = "sum(rate(vllm:generation_tokens_total{$selector}[$window]))"
    generation_tokens_histogram: PromQL = (
        "sum by (le) (rate(vllm:request_generation_tokens_bucket{$selector}[$window]))"
    )
    requests_waiting: PromQL = "sum(vllm:num_requests_waiting{$selector})"
    latency_p95: PromQL = (
        "histogram_quantile(0.95, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket{$selector}[$window])))"
    )
    time_to_first_token_p95: PromQL = (
        "histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{$selector}[$window])))"
    )
    time_per_output_token_p95: PromQL = (
        "histogram_quantile(0.95, sum by (le) (rate(vllm:time_per_output_token_seconds_bucket{$selector}[$window])))"
    )


class Metrics(ApiModel):
    prometheus_url: str = Field(
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description="Base URL of the Prometheus HTTP API, e.g. http://prometheus.monitoring:9090.",
    )
    auth: PrometheusAuth | None = None
    ca_secret_ref: SecretKeyRef | None = Field(default=None, description="CA bundle for https.")
    insecure_skip_verify: bool = False
    timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    selector: str = Field(
        default=DEFAULT_SELECTOR,
        max_length=1024,
        description="PromQL label matchers for this model's series; $namespace is this object's namespace.",
    )
    window: str = Field(default="2m", pattern=r"^[0-9]+(s|m|h)$", max_length=16)
    max_staleness_seconds: float = Field(default=120, gt=0, le=86_400, description="Older samples count as missing.")
    queries: Queries = Field(default_factory=Queries)


class OpenCostQueries(ApiModel):
    """PromQL for OpenCost's per-node prices; each answer has one series per node, named by
    ``nodeLabel``. A query that keeps the raw series keeps their sample times (staleness)."""

    node_hourly_cost: PromQL = Field(
        default="node_total_hourly_cost", description="Dollars per hour each node costs in all (what is billed)."
    )
    gpu_hourly_cost: PromQL = Field(
        default="node_gpu_hourly_cost", description="The GPU part: dollars per GPU-hour on each node (reported)."
    )
    node_label: str = Field(
        default="node",
        min_length=1,
        max_length=63,
        pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$",
        description="The label that carries the Node's name.",
    )


class Spend(ApiModel):
    """Where the ledger's prices come from. ``Spec``: each pool's ``pricePerGpuHour``.
    ``OpenCost``: what OpenCost says each running node costs, read from ``metrics.prometheusUrl``;
    the spec's prices still size the plan, and stand in whenever the observed ones are missing
    or stale (condition PricesObserved=False, reason PricesFromSpec)."""

    source: PriceSource = PriceSource.SPEC
    price_tolerance: float = Field(
        default=0.1,
        gt=0,
        le=10,
        description="OpenCost: a pool whose observed node price differs from the spec's by more than "
        "this fraction is flagged (reason PriceMismatch).",
    )
    max_staleness_seconds: float = Field(
        default=600, gt=0, le=86_400, description="OpenCost: older prices count as missing."
    )
    queries: OpenCostQueries = Field(default_factory=OpenCostQueries)


class Slo(ApiModel):
    latency_seconds: float = Field(default=30.0, gt=0, le=86_400, description="End-to-end latency target.")
    percentile: float = Field(default=95, gt=0, lt=100)
    time_to_first_token_seconds: float | None = Field(
        default=None, gt=0, le=86_400, description="Time-to-first-token target (vllm:time_to_first_token_seconds)."
    )
    time_per_output_token_seconds: float | None = Field(
        default=None,
        gt=0,
        le=60,
        description="Inter-token latency target (vllm:time_per_output_token_seconds).",
    )


class ScaleUp(ApiModel):
    max_replicas_per_period: int = Field(default=4, ge=1, le=100_000)
    max_percent_per_period: float = Field(default=100, gt=0, le=10_000)
    period_seconds: int = Field(default=60, ge=1, le=3600)


class ScaleDown(ApiModel):
    stabilization_window_seconds: int = Field(default=300, ge=0, le=86_400)


class NodeScaleDown(ApiModel):
    stabilization_window_seconds: int = Field(default=600, ge=0, le=86_400)


@cross_field_rules(
    CrossFieldRule(
        cel="self.action != 'ScaleTo' || has(self.replicas)",
        message="behavior.fallback.replicas is required when action is ScaleTo",
        check=lambda f: f.action != FallbackAction.SCALE_TO or f.replicas is not None,
    ),
)
class Fallback(ApiModel):
    """What to do once metrics have been missing for ``afterSeconds``. Never a scale-up."""

    after_seconds: int = Field(default=120, ge=0, le=86_400)
    action: FallbackAction = FallbackAction.HOLD
    replicas: int | None = Field(
        default=None, ge=0, le=100_000, description="ScaleTo: scale down to this many (never up)."
    )


class Forecast(ApiModel):
    """Look ahead: the slow knobs are sized for the demand forecast over the time they take to arrive."""

    enabled: bool = Field(default=True, description="Size replicas and nodes for the forecast's upper quantile.")
    horizon_seconds: int = Field(
        default=180,
        ge=15,
        le=3600,
        description="How far ahead to look: node provisioning plus replica start (when new capacity serves).",
    )
    quantile: float = Field(
        default=0.5,
        ge=0.5,
        le=0.99,
        description="Quantile of the demand peak within the horizon that is sized for (0.5: the median peak).",
    )
    headroom: Headroom = Field(
        default=Headroom.AUTO,
        description="Where the capacity the forecast wants beyond today's replicas goes. Replicas: more replicas "
        "of the target (and the nodes they need). CapacityBuffer: a SIG Autoscaling CapacityBuffer "
        "(autoscaling.x-k8s.io/v1beta1) named after this ModelBudget, scalableRef the target, whose placeholder "
        "pods have the cluster autoscaler (Karpenter, Cluster Autoscaler) bring the nodes up ahead; its nodes "
        "count within the ceiling like any other. Auto: CapacityBuffer where the cluster serves that API, "
        "else Replicas.",
    )


class Behavior(ApiModel):
    scale_up: ScaleUp = Field(default_factory=ScaleUp)
    scale_down: ScaleDown = Field(default_factory=ScaleDown)
    node_scale_down: NodeScaleDown = Field(default_factory=NodeScaleDown)
    fallback: Fallback = Field(default_factory=Fallback)
    forecast: Forecast = Field(default_factory=Forecast)
    queue_drain_seconds: float = Field(
        default=60, gt=0, le=3600, description="Waiting requests are planned to drain within this time."
    )


class HTTPRouteRef(ApiModel):
    """A Gateway API HTTPRoute in the ModelBudget's own namespace."""

    name: Name


class Routing(ApiModel):
    """Where the variants' traffic shares are published for the users' traffic to follow."""

    http_route_ref: HTTPRouteRef = Field(
        description="The HTTPRoute whose backendRefs to the variants' Services get the variants' weights "
        "(percent; 0 keeps the backendRef and sends it no traffic). Its other backendRefs and fields are "
        "left as they are."
    )


@cross_field_rules(
    CrossFieldRule(
        cel="!has(self.nodePools) || self.nodePools.all(p, p.gpusPerNode >= self.replicas.gpusPerReplica)",
        message="every node pool needs gpusPerNode >= replicas.gpusPerReplica (a replica must fit on a node)",
        check=lambda s: all(p.gpus_per_node >= s.replicas.gpus_per_replica for p in s.node_pools),
    ),
    CrossFieldRule(
        cel="!has(self.nodePools) || self.nodePools.all(p, self.nodePools.exists_one(q, q.name == p.name))",
        message="nodePools[].name must be unique",
        check=lambda s: len({p.name for p in s.node_pools}) == len(s.node_pools),
    ),
    CrossFieldRule(
        cel="(has(self.nodePools) && size(self.nodePools) > 0) "
        "|| (has(self.sharedPools) && size(self.sharedPools) > 0)",
        message="give at least one of nodePools or sharedPools",
        check=lambda s: bool(s.node_pools) or bool(s.shared_pools),
    ),
    CrossFieldRule(
        cel="!has(self.sharedPools) || self.sharedPools.all(s, self.sharedPools.exists_one(q, q.pool == s.pool) "
        "&& (!has(self.nodePools) || self.nodePools.all(p, p.name != s.pool)))",
        message="sharedPools[].pool must be unique and differ from every nodePools[].name",
        check=lambda s: (
            len({p.pool for p in s.shared_pools}) == len(s.shared_pools)
            and not {p.pool for p in s.shared_pools} & {p.name for p in s.node_pools}
        ),
    ),
)
class ModelBudgetSpec(ApiModel):
    mode: Mode = Field(default=Mode.ENFORCE, description="Recommend: compute and report, change nothing.")
    target_ref: TargetRef
    curve: Curve
    budget: Budget
    replicas: Replicas
    node_pools: list[NodePool] = Field(
        default_factory=list,
        max_length=16,
        description="Pools this ModelBudget has to itself, declared inline (see sharedPools for shared ones).",
    )
    shared_pools: list[SharedPool] = Field(
        default_factory=list,
        max_length=16,
        description="GpuPools declared by the cluster admin that this ModelBudget draws from and is billed a share of.",
    )
    token_limits: TokenLimits = Field(default_factory=TokenLimits)
    metrics: Metrics
    spend: Spend = Field(default_factory=Spend)
    slo: Slo = Field(default_factory=Slo)
    behavior: Behavior = Field(default_factory=Behavior)
    routing: Routing | None = Field(
        default=None, description="Publish the variants' traffic shares on a Gateway API HTTPRoute."
    )

    def pool(self, name: str) -> NodePool:
        return next(p for p in self.node_pools if p.name == name)


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None
    generation: int | None = None


class ModelBudget(BaseModel):
    """A whole manifest, as read from a file or the apiserver (status ignored)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    api_version: Literal["modelbudget.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["ModelBudget"]
    metadata: ObjectMeta
    spec: ModelBudgetSpec
