"""Weight reconstruction after calibration: Q-Diffusion's BRECQ + AdaRound and EDA-DM's FBR.

Round-to-nearest is the best rounding of each weight alone, not of a block's output; at 4 bits
that difference is most of the error (docs/results). Reconstruction chooses, per block of the
network, whether each weight rounds up or down (and optionally the activation steps) so that
the quantized block reproduces the float block's output on the calibration inputs. The result
stays on the recipe's integer grid with the calibration table's scales, so the Q/DQ pass writes
it into the graph unchanged in form (`export.qdq.insert_qdq(..., weights=...)`).

Modules: `settings` (the recipe section), `adaround` (soft rounding and its regulariser),
`lsq` (learned activation steps), `qlayer` (a quantized layer with those parameters),
`blocks` (BRECQ's reconstruction units), `capture` (block inputs and targets), `engine` (the
per-block loop, its checkpoints and losses), `artifact` (the integer weights on disk).
"""
