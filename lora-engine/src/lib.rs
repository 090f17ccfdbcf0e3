//! The serving engine: ties lora-slots, lora-gemm and lora-graph to a Llama-architecture model (later issues).
