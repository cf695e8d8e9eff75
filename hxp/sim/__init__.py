"""Development doubles of the services hxp orchestrates; they stand in for the real ones in tests.

`hxp.sim.vllm` (`hxp-vllm-sim`) imitates a vLLM OpenAI-compatible server. It is not vLLM.
"""
