//! The chat templates of the families Magpie configures (`pre_query::FAMILIES`), as their models
//! ship them, trimmed to the parts that shape the prompt: the whole chat template a family named
//! with `--template` supplies when a model (a server's tokenizer, an older GGUF) carries none.
//! Gemma's is Gemma 3's, whose system message opens the first user turn.

use super::chat_template::ChatTemplate;
use anyhow::Result;

pub const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
pub const QWEN2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
pub const QWEN25: &str = "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if message.role != 'system' %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
pub const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
pub const PHI3: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";
pub const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}";
pub const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// The chat template of family `name` (a `--template` family name) with its special tokens, if
/// the family has one here.
pub fn chat_template(name: &str) -> Option<Result<ChatTemplate>> {
    let (source, bos, eos) = match name {
        "llama3" | "llama3.1" | "llama3.3" => (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
        "qwen2" | "qwen1.5" => (QWEN2, "", "<|im_end|>"),
        "qwen2.5" => (QWEN25, "", "<|im_end|>"),
        "smollm2" | "chatml" => (SMOLLM2, "<|im_start|>", "<|im_end|>"),
        "gemma" | "gemma2" => (GEMMA, "<bos>", "<eos>"),
        "phi3" | "phi3.5" => (PHI3, "<s>", "<|endoftext|>"),
        "mistral" | "llama2" => (MISTRAL, "<s>", "</s>"),
        _ => return None,
    };
    Some(ChatTemplate::new(source, bos, eos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Message;
    use crate::model::pre_query::FAMILIES;

    #[test]
    fn every_family_name_has_a_chat_template_that_renders_a_conversation() {
        for name in FAMILIES.iter().flat_map(|f| f.names.iter()) {
            let template = chat_template(name).unwrap_or_else(|| panic!("{name} has no chat template")).unwrap();
            let text = template.render(&[Message::new("user", "Hi"), Message::new("assistant", "Hello"), Message::new("user", "Bye")], true).unwrap();
            assert!(text.contains("Hi") && text.contains("Hello") && text.contains("Bye"), "{name}: {text:?}");
        }
    }

    #[test]
    fn gemma_puts_the_system_message_into_the_first_user_turn() {
        let template = chat_template("gemma").unwrap().unwrap();
        let text = template.render(&[Message::new("system", "Be brief."), Message::new("user", "Hi"), Message::new("assistant", "Hello"), Message::new("user", "Bye")], true).unwrap();
        assert_eq!(text, "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n");
    }
}
