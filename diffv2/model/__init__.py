"""The single-device model: DIFF V2 / baseline / DIFF V1 attention, MoE, the Transformer, its loss, kernels and
FLOP accounting. Nothing here knows about ranks or engines; diffv2/parallel/ applies parallelism from outside."""
