"""A run's precision policy: the one place its numeric rules are written.

- fp32: weights, gradients and the optimiser in fp32; Adam keeps two moments.
- bf16: bf16 weights and activations; gradients accumulated over
  micro-batches and reduced over dp in fp32 (Megatron's practice: a step of a
  large run sums thousands of micro-batches, and DeepSpeed's default would
  cast the fp32 sums to bf16 for the all-reduce and back); an fp32 master
  copy and two fp32 moments. Needs ZeRO >= 1: DeepSpeed's ZeRO-0 keeps bf16
  gradients and the weights drift, and with pp > 1 its engine refuses bf16
  weights with fp32 accumulation.
- fp16: fp16 weights and gradients (reduced in fp16), dynamic loss scaling,
  an fp32 master copy and moments (GPU only: ``orchestrator.planning.plan``).

Read by the plan's checks and layout search, the DeepSpeed JSON, the memory
and time model, and the monitor (the loss scale).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    """``train.precision`` and what follows from it."""

    name: str  # fp32, bf16 or fp16 (config.rules.PRECISIONS)

    @property
    def weight_bytes(self) -> int:
        """Bytes per weight, activation and (but for bf16) gradient element."""
        return 4 if self.name == "fp32" else 2

    @property
    def accumulates_in_fp32(self) -> bool:
        """Gradients accumulated and reduced in fp32 while the weights are 16-bit (bf16)."""
        return self.name == "bf16"

    @property
    def reduce_bytes(self) -> int:
        """Bytes per gradient element in the dp reduction."""
        return 2 if self.name == "fp16" else 4

    @property
    def optimizer_bytes(self) -> int:
        """Optimiser bytes per parameter: two fp32 moments, plus an fp32 master if 16-bit."""
        return 8 if self.name == "fp32" else 12

    @property
    def loss_scaling(self) -> bool:
        """Dynamic loss scaling (fp16): an overflowing step is the scaler's, not a bad step."""
        return self.name == "fp16"

    @property
    def min_zero_stage(self) -> int:
        return 1 if self.name == "bf16" else 0

    def check_zero_stage(self, zero_stage: int) -> None:
        """``ValueError`` (one line) when ``zero_stage`` cannot hold this precision."""
        if zero_stage < self.min_zero_stage:
            raise ValueError(
                f"parallel.zero_stage={zero_stage}: train.precision={self.name} needs "
                f"parallel.zero_stage >= {self.min_zero_stage} (DeepSpeed's ZeRO-0 accumulates "
                "bf16 gradients, or with pp > 1 refuses fp32 accumulation)"
            )

    def deepspeed_json(self) -> dict[str, object]:
        """The DeepSpeed JSON's precision keys."""
        ds: dict[str, object] = {
            "bf16": {"enabled": self.name == "bf16"},
            "fp16": {
                "enabled": self.name == "fp16",
                "loss_scale": 0,  # dynamic
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            },
        }
        if self.accumulates_in_fp32:
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
            ds["communication_data_type"] = "fp32"
        return ds
