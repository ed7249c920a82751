"""Triton Python-backend model: an exported ONNX image classifier run with onnxruntime.

Copied verbatim into ``<repository>/<model>/<version>/model.py`` next to ``model.onnx``. It runs inside Triton's
Python-backend stub, so it may only import what the serving environment has: numpy and onnxruntime (no torch).

Execution providers are tried in the order TensorRT -> CUDA -> CPU, keeping those this onnxruntime build offers;
the providers the session really uses are written to the server log at start-up.
"""

import importlib.util
import json
import os
import sys
import time

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
COST_FLUSH_AFTER = 32  # the CPU-time counters are sent once this many requests or images are pending (a round trip)
COST_COUNTERS = {  # key: (Prometheus name, help)
    "execute": ("medops_execute_cpu_seconds_total",
                "CPU time of this stub in execute(), onnxruntime included (every thread of the stub)"),
    "onnxruntime": ("medops_onnxruntime_cpu_seconds_total",
                    "CPU time of this stub while onnxruntime runs (every thread of the stub)"),
    "images": ("medops_execute_images_total", "images whose CPU time the two medops_*_cpu_seconds_total count"),
}
REFUSED_COUNTER = ("medops_input_refused_total",
                   "requests refused as the client's fault (HTTP 400 / INVALID_ARGUMENT), by reason: form (input name, "
                   "dtype, shape) or values (NaN, Inf, outside [0, 1]); Triton counts them as successes")
DRIFT_DEFAULTS = {"window": 256, "min_window": 64, "every": 32, "hysteresis_on": 2, "hysteresis_off": 3,
                  "alpha": 0.01, "psi_threshold": 0.2}


def load_module(name, path):
    """Import a numpy-only helper that export copied next to this file (this stub has no medops package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def invalid_argument(message):
    """A Triton error that reaches the client as HTTP 400 / gRPC INVALID_ARGUMENT (a plain one would be a 500)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)  # Triton 23.06 and later
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def choose_providers(available):
    """The preferred providers this onnxruntime offers, best first (never empty: CPU is the fallback)."""
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen or ["CPUExecutionProvider"]


def stack(pairs):
    """The arrays of (index, array) pairs as one batch (a lone array as it is: no copy for one request)."""
    return pairs[0][1] if len(pairs) == 1 else np.concatenate([a for _, a in pairs], axis=0)


class TritonPythonModel:
    """One model instance: one onnxruntime session, batched over all requests of an ``execute`` call."""

    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", self.model_config.get("name", "model"))
        inputs = self.model_config["input"]
        outputs = self.model_config["output"]
        if len(inputs) != 1 or not outputs:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: expected exactly one input and at least one output in config.pbtxt, "
                f"got {len(inputs)} and {len(outputs)}"
            )
        self.input_name = inputs[0]["name"]
        # probabilities first; ood_score / ood_flag when the graph computes them (same names in the ONNX graph)
        self.output_names = [o["name"] for o in outputs]
        self.all_outputs = list(range(len(self.output_names)))
        self.input_dims = tuple(int(d) for d in inputs[0]["dims"])

        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self._verify_files(version_dir, args["model_version"])
        onnx_path = os.path.join(version_dir, "model.onnx")
        if not os.path.isfile(onnx_path):
            raise pb_utils.TritonModelException(f"{self.model_name}: ONNX file not found: {onnx_path}")
        check_path = os.path.join(version_dir, "input_check.py")  # medops/input_check.py: NaN, Inf, [0, 1]
        if not os.path.isfile(check_path):
            raise pb_utils.TritonModelException(f"{self.model_name}: {check_path} not found (re-export the model)")
        self.input_check = load_module(f"input_check_{self.model_name}_{args['model_version']}", check_path)

        self.session, providers = self._session(onnx_path)
        try:
            self._init_cost_counters(args["model_version"])
        except Exception as exc:  # the counters must not keep the model from serving
            self.cost = None
            pb_utils.Logger.log_warn(f"{self.model_name}: CPU-time counters off: {type(exc).__name__}: {exc}")
        try:
            self._init_monitoring(os.path.join(args["model_repository"], args["model_version"]), args["model_version"])
        except Exception as exc:  # a broken drift reference must not keep the model from serving
            self.monitor = None
            pb_utils.Logger.log_error(f"{self.model_name}: drift monitoring off: {type(exc).__name__}: {exc}")
        self.onnx_input = self.session.get_inputs()[0].name
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if len(self.output_names) == 1:  # a one-output config serves the graph's first output under its name
            self.onnx_outputs = graph_outputs[:1]
        else:
            missing = [n for n in self.output_names if n not in graph_outputs]
            if missing:
                raise pb_utils.TritonModelException(
                    f"{self.model_name}: outputs {missing} of config.pbtxt are not in {onnx_path} ({graph_outputs})")
            self.onnx_outputs = list(self.output_names)
        pb_utils.Logger.log_info(
            f"{self.model_name} v{args['model_version']}: onnxruntime {onnxruntime.__version__} "
            f"providers in use: {', '.join(self.session.get_providers())} (requested: {', '.join(providers)})"
        )

    def _session(self, onnx_path):
        """The onnxruntime session of ``model.onnx`` and the providers it was asked for."""
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Threads: config.pbtxt parameter ort_intra_op_threads, else $MEDOPS_ORT_THREADS, else 0 = onnxruntime's
        # default (one per physical core); one inter-op thread, sequential execution (the CNN is a chain of ops).
        # Pool threads do not busy-wait between requests (they share the cores with Triton's request threads);
        # ort_allow_spinning / $MEDOPS_ORT_SPINNING "1" turns spinning back on.
        ort_params = {k: v.get("string_value", "") for k, v in (self.model_config.get("parameters") or {}).items()}
        options.intra_op_num_threads = int(ort_params.get("ort_intra_op_threads") or os.environ.get(
            "MEDOPS_ORT_THREADS") or 0)
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        spinning = ort_params.get("ort_allow_spinning") or os.environ.get("MEDOPS_ORT_SPINNING") or "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning == "1" else "0")
        providers = choose_providers(onnxruntime.get_available_providers())
        return onnxruntime.InferenceSession(onnx_path, sess_options=options, providers=providers), providers

    def _verify_files(self, version_dir, version):
        """Refuse to load a version whose files differ from the SHA-256 digests (and HMAC signature, with
        MEDOPS_MODEL_SIGNING_KEY) export recorded in metadata.json: ``integrity.py`` is medops/integrity.py."""
        path = os.path.join(version_dir, "integrity.py")
        if not os.path.isfile(path):
            pb_utils.Logger.log_warn(f"{self.model_name} v{version}: no integrity.py, files not verified (re-export)")
            return
        integrity = load_module(f"integrity_{self.model_name}_{version}", path)
        problems = integrity.verify_version(version_dir, os.environ.get(integrity.KEY_ENV) or None)
        if problems:
            message = (f"{self.model_name} v{version} refused: its files are not what export wrote: "
                       f"{'; '.join(problems)}")
            pb_utils.Logger.log_error(message)
            raise pb_utils.TritonModelException(message)
        pb_utils.Logger.log_info(f"{self.model_name} v{version}: files verified against metadata.json")

    def _init_cost_counters(self, version):
        """Prometheus counters of this stub's CPU time in execute() and, within it, in onnxruntime, with the images
        they cover: their difference is the served model's own Python (input checks, drift window, responses), and
        Triton's CPU beyond execute() is the server's own. Kept here and sent once ``COST_FLUSH_AFTER`` requests or
        images are pending (a send is a round trip to the Triton process, and its own CPU counts with the next
        execute() calls); an execute() that ran no image is left out, so the three stay in step."""
        self.cost, self.refused = None, None
        if not hasattr(pb_utils, "MetricFamily"):
            return
        labels = {"model": self.model_name, "version": str(version), "stub": str(os.getpid())}
        self.cost_families = {k: pb_utils.MetricFamily(name=n, description=d, kind=pb_utils.MetricFamily.COUNTER)
                              for k, (n, d) in {**COST_COUNTERS, "refused": REFUSED_COUNTER}.items()}
        self.cost = {"metrics": {k: self.cost_families[k].Metric(labels=labels) for k in COST_COUNTERS},
                     "pending": dict.fromkeys(COST_COUNTERS, 0.0), "requests": 0}
        self.refused = {r: self.cost_families["refused"].Metric(labels={**labels, "reason": r})
                        for r in ("form", "values")}

    def _account(self, start, onnxruntime_s, images, requests):
        """Add one execute() (begun at process time ``start``) to the counters; send them once enough are pending."""
        if not images:  # every request refused, or onnxruntime failed: no image to count the time against
            return
        cost = self.cost
        pending = cost["pending"]
        pending["execute"] += time.process_time() - start
        pending["onnxruntime"] += onnxruntime_s
        pending["images"] += images
        cost["requests"] += requests
        if max(cost["requests"], pending["images"]) >= COST_FLUSH_AFTER:
            sending = time.process_time()
            self._flush_cost()
            cost["pending"]["execute"] += time.process_time() - sending  # the send's CPU goes with the next ones

    def _count_refused(self, form, values):
        """Count refused requests (each a round trip to the Triton process; refusals are rare)."""
        if getattr(self, "refused", None) is None or not (form or values):
            return
        try:
            for reason, n in (("form", form), ("values", values)):
                if n:
                    self.refused[reason].increment(n)
        except Exception as exc:  # counting must never cost a response
            pb_utils.Logger.log_warn(f"{self.model_name}: refusal counter failed: {exc}")

    def _flush_cost(self):
        """Send what is pending; it is cleared first, so a failed send loses that share rather than counting it
        twice."""
        pending, self.cost["pending"] = self.cost["pending"], dict.fromkeys(COST_COUNTERS, 0.0)
        self.cost["requests"] = 0
        for key, value in pending.items():
            if value:
                self.cost["metrics"][key].increment(value)

    def _parameter(self, key, default):
        value = (self.model_config.get("parameters") or {}).get(key, {}).get("string_value", "")
        return type(default)(value) if value not in ("", None) else default

    def _init_monitoring(self, version_dir, version):
        """Drift monitoring against ``drift_reference.npz`` with the shared ``drift_core.py``; Prometheus gauges
        next to Triton's own metrics. Monitoring never fails inference: without the files it is off."""
        self.monitor = None
        core_path = os.path.join(version_dir, "drift_core.py")
        profile_path = os.path.join(version_dir, "drift_reference.npz")
        if not (os.path.isfile(core_path) and os.path.isfile(profile_path)):
            pb_utils.Logger.log_info(f"{self.model_name} v{version}: no drift reference, drift monitoring off")
            return
        if not hasattr(pb_utils, "MetricFamily"):
            pb_utils.Logger.log_warn(f"{self.model_name}: this Triton has no custom metrics; drift monitoring off")
            return
        core = load_module(f"drift_core_{self.model_name}_{version}", core_path)
        profile = core.load_profile(profile_path)
        settings = {k: self._parameter(f"drift_{k}", v) for k, v in DRIFT_DEFAULTS.items()}
        features = sorted(f for f in profile["features"] if not f.startswith("image_"))  # raw sizes: offline only
        size = max(settings["window"], settings["min_window"])
        self.monitor = {
            "core": core, "settings": settings, "reference": profile["features"],
            "class_names": profile["class_names"], "since_check": 0, "pending": [],  # batches since the last test
            "prepared": {}, "published": {},  # the reference prepared once (drift_core.compare); gauge values set
            "names": None, "ring": None, "size": size, "filled": 0, "next": 0,  # the rolling window, see _append
            "thresholds": core.DriftThresholds(alpha=settings["alpha"], psi_threshold=settings["psi_threshold"],
                                               min_window=settings["min_window"]),
            "alarm": core.Hysteresis(settings["hysteresis_on"], settings["hysteresis_off"]),
        }
        # one series per stub process: a series two stubs share (a reload overlaps the old and the new instance of
        # a version; instance_group count > 1) is freed with the first stub and the next update from the other
        # crashes Triton (triton-inference-server/server#8663); each stub also keeps its own window
        labels = {"model": self.model_name, "version": str(version), "stub": str(os.getpid())}
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        families = {
            "detected": ("medops_drift_detected", "1 while drift is detected (with hysteresis)", gauge),
            "score": ("medops_drift_score", "largest population stability index over the drift features", gauge),
            "psi": ("medops_drift_psi", "population stability index of one feature vs the reference", gauge),
            "p_value": ("medops_drift_p_value", "KS (chi-square for classes) p-value of one feature", gauge),
            "window": ("medops_drift_window_images", "images in the rolling drift window", gauge),
            "share": ("medops_prediction_class_share", "share of predicted classes in the rolling window", gauge),
            "intensity": ("medops_input_intensity_mean", "mean input intensity [0, 1] in the rolling window", gauge),
            "checks": ("medops_drift_checks_total", "drift tests run on the rolling window", counter),
            "ood": ("medops_ood_flagged_total", "images flagged out-of-distribution (ood_flag)", counter),
        }
        self.families = {k: pb_utils.MetricFamily(name=n, description=d, kind=kind)
                         for k, (n, d, kind) in families.items()}
        self.metrics = {k: self.families[k].Metric(labels=labels)
                        for k in ("detected", "score", "window", "intensity", "checks", "ood")}
        self.metrics["psi"] = {f: self.families["psi"].Metric(labels={**labels, "feature": f}) for f in features}
        self.metrics["p_value"] = {f: self.families["p_value"].Metric(labels={**labels, "feature": f})
                                   for f in features}
        self.metrics["share"] = [self.families["share"].Metric(labels={**labels, "class": c})
                                 for c in profile["class_names"]]
        self._set(self.metrics["detected"], 0.0)
        for metric in (self.metrics["score"], *self.metrics["psi"].values(), *self.metrics["p_value"].values()):
            metric.set(float("nan"))  # no test yet: a p-value of 0 would read as certain drift on a dashboard
        pb_utils.Logger.log_info(
            f"{self.model_name} v{version}: drift monitoring on ({len(features)} features, window "
            f"{settings['window']}, test every {settings['every']} images once {settings['min_window']} are in)"
        )

    def _observe(self, batch, probs, ood_flags=None):
        """Keep a batch for the rolling window; every ``every`` images compute its features, re-test drift and
        update the gauges.

        Cheap per batch by design, because one-image requests make a batch per request: the features (per-image
        percentiles) are computed once over the images kept since the last test, and each gauge update is a round
        trip to the Triton process on the serving cores, so the gauges move with each test, not each batch."""
        m = self.monitor
        informative = np.ptp(batch.reshape(len(batch), -1), axis=1) > 0
        if not informative.all():  # blank images (Triton's warm-up sends one) say nothing of the inputs' distribution
            batch, probs = batch[informative], probs[informative]
            ood_flags = None if ood_flags is None else ood_flags[informative]
            if not len(batch):
                return
        if ood_flags is not None:
            flagged = int(np.count_nonzero(ood_flags))
            if flagged:
                self.metrics["ood"].increment(flagged)
        # a one-request batch is a view of the request's input tensor, which Triton frees after this call
        m["pending"].append((batch if batch.flags.owndata else batch.copy(), probs))
        m["since_check"] += len(batch)
        if m["since_check"] < m["settings"]["every"]:
            return
        core = m["core"]
        images = np.concatenate([b for b, _ in m["pending"]]) if len(m["pending"]) > 1 else batch
        predicted = np.concatenate([p for _, p in m["pending"]]) if len(m["pending"]) > 1 else probs
        m["pending"], m["since_check"] = [], 0
        self._append({**core.image_features(images), **core.prediction_features(predicted, m["class_names"])})
        window = m["ring"][:m["filled"]]
        current = {k: window[:, i] for i, k in enumerate(m["names"])}
        self._publish_window(current)
        if m["filled"] >= m["settings"]["min_window"]:
            self._publish_test(core.compare(m["reference"], current, num_classes=len(m["class_names"]),
                                            thresholds=m["thresholds"], cache=m["prepared"]))

    def _append(self, feats):
        """Write a batch's feature rows into the ring buffer of the newest ``size`` images (order is irrelevant to
        the distribution tests, so no deque and no copy per batch)."""
        m = self.monitor
        if m["ring"] is None:
            m["names"] = list(feats)
            m["ring"] = np.zeros((m["size"], len(m["names"])), dtype=np.float64)
        rows = np.column_stack([np.asarray(feats[k], dtype=np.float64) for k in m["names"]])[-m["size"]:]
        index = (m["next"] + np.arange(len(rows))) % m["size"]
        m["ring"][index] = rows
        m["next"] = int((m["next"] + len(rows)) % m["size"])
        m["filled"] = min(m["size"], m["filled"] + len(rows))

    def _publish_window(self, current):
        """The rolling window's gauges: its size, mean intensity and predicted class shares."""
        m, metrics = self.monitor, self.metrics
        core = m["core"]
        self._set(metrics["window"], m["filled"])
        self._set(metrics["intensity"], float(current["intensity_mean"].mean()))
        classes = current[core.CLASS_FEATURE].astype(np.int64)
        shares = np.bincount(classes, minlength=len(m["class_names"])) / max(1, len(classes))
        for metric, share in zip(metrics["share"], shares, strict=True):
            self._set(metric, float(share))

    def _publish_test(self, result):
        """The gauges of one drift test: score, per-feature PSI and p-value, the alarm (with hysteresis)."""
        m, metrics = self.monitor, self.metrics
        metrics["checks"].increment(1)
        self._set(metrics["score"], result.score)
        for f in result.features:
            if f.feature in metrics["psi"]:
                self._set(metrics["psi"][f.feature], float(f.psi))
                self._set(metrics["p_value"][f.feature], float(f.p_value))
        self._set(metrics["detected"], 1.0 if m["alarm"].update(result.drifted) else 0.0)

    def _set(self, metric, value):
        """Set a gauge unless it already holds ``value``: each set is a round trip to the Triton process on the
        serving core, and the window's size, the alarm and the class shares mostly stay as they were."""
        published = self.monitor["published"]
        if published.get(id(metric)) != value:
            metric.set(value)
            published[id(metric)] = value

    def _check(self, request):
        """The request's input array, or an error message saying what is wrong with its form (name, dtype, shape);
        its values are checked per batch in ``_check_values``."""
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            return None, f"missing input {self.input_name!r}"
        array = tensor.as_numpy()
        expected = f"[N, {', '.join(str(d) for d in self.input_dims)}]"
        if array.dtype != np.float32:
            return None, f"input {self.input_name!r} must be FP32 (float32), got {array.dtype}"
        if array.ndim != 1 + len(self.input_dims):
            return None, (
                f"input {self.input_name!r} must have {1 + len(self.input_dims)} dims {expected}, "
                f"got shape {list(array.shape)}"
            )
        if tuple(array.shape[1:]) != self.input_dims:
            return None, f"input {self.input_name!r} has shape {list(array.shape)}, expected {expected}"
        return array, None

    def _check_values(self, arrays, responses):
        """The batch of the requests whose values are valid (NaN, Inf, [0, 1]) and their (index, array) pairs; the
        others get their 400 in ``responses``. One check over the whole batch in the usual case where every input is
        valid (numpy's per-call cost is most of a one-image check); per request only when the batch fails, so each
        client still gets its own reason."""
        batch = stack(arrays)
        if self.input_check.value_problem(batch) is None:
            return batch, arrays
        valid = []
        for i, array in arrays:
            problem = self.input_check.value_problem(array)
            if problem:
                responses[i] = self._error(f"input {self.input_name!r}: {problem}")
            else:
                valid.append((i, array))
        if not valid:
            return None, valid
        return stack(valid), valid

    def _error(self, message):
        """The client's fault: HTTP 400 / gRPC INVALID_ARGUMENT, with the reason."""
        return pb_utils.InferenceResponse(output_tensors=[], error=invalid_argument(f"{self.model_name}: {message}"))

    def _wanted(self, request):
        """Indices of the outputs ``request`` asked for (all when it names none): the others are not built."""
        names = set(request.requested_output_names() or ())
        return [k for k, n in enumerate(self.output_names) if n in names] or self.all_outputs

    def execute(self, requests):
        start = time.process_time()
        responses, onnxruntime_s, images = self._execute(requests)
        if self.cost is not None:
            try:
                self._account(start, onnxruntime_s, images, len(requests))
            except Exception as exc:  # accounting must never cost a response
                pb_utils.Logger.log_warn(f"{self.model_name}: CPU-time counters failed: {exc}")
        return responses

    def _execute(self, requests):
        """The responses to ``requests`` (one onnxruntime run over all valid ones), onnxruntime's CPU seconds (every
        thread of this process) and the images it ran."""
        responses = [None] * len(requests)
        arrays = []  # (index, array) of the requests whose input has the right form
        for i, request in enumerate(requests):
            array, error = self._check(request)
            if error is not None:
                responses[i] = self._error(error)
            else:
                arrays.append((i, array))
        if not arrays:
            self._count_refused(len(requests), 0)
            return responses, 0.0, 0
        batch, valid = self._check_values(arrays, responses)
        self._count_refused(len(requests) - len(arrays), len(arrays) - len(valid))
        if not valid:
            return responses, 0.0, 0
        try:
            ort_start = time.process_time()
            results = [np.ascontiguousarray(r) for r in self.session.run(self.onnx_outputs, {self.onnx_input: batch})]
            onnxruntime_s = time.process_time() - ort_start
            result = results[0] = results[0].astype(np.float32, copy=False)
        except Exception as exc:  # report to every client instead of killing the stub
            message = f"{self.model_name}: onnxruntime failed: {exc}"
            for i, _ in valid:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
            return responses, 0.0, 0
        if self.monitor is not None:
            try:
                self._observe(batch, result, results[2] if len(results) > 2 else None)
            except Exception as exc:  # monitoring must never cost a response
                pb_utils.Logger.log_warn(f"{self.model_name}: drift monitoring failed: {exc}")
        start = 0
        for i, array in valid:
            stop = start + array.shape[0]
            outs = [pb_utils.Tensor(self.output_names[k], results[k][start:stop]) for k in self._wanted(requests[i])]
            responses[i] = pb_utils.InferenceResponse(output_tensors=outs)
            start = stop
        return responses, onnxruntime_s, len(batch)

    def finalize(self):
        if getattr(self, "cost", None) is not None:
            try:
                self._flush_cost()
            except Exception:  # the server may be going away
                pass
        self.session = None
        self.monitor = None
        self.metrics = {}
        self.families = {}
