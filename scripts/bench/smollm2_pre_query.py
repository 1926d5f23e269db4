"""SmolLM2-135M-Instruct's Magpie pre-query template and instruction stops, as `magpie synth`
builds them from the embedded model's chat template: the baselines of synth.sh and
synth-server.sh share them."""
PRE_QUERY = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"
STOPS = ["<|im_end|>", "<|im_start|>", "assistant", "\n"]
