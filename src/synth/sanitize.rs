//! Optional clean-up of generated instructions (`--sanitize`, docs/upstream.md §2): strip leading
//! numbering and "Task:"-style prefixes, and cut where the model starts answering its own
//! question ("Answer:", "Solution:", "## Step 1"). The raw text is kept beside the result.

/// Prefixes a model puts before the instruction itself, matched case-insensitively after any
/// leading numbering.
const PREFIXES: &[&str] = &["task", "question", "instruction", "query", "prompt", "user", "q"];

/// Markers after which the model is answering rather than asking.
const ANSWER_MARKERS: &[&str] = &["Answer:", "Solution:", "## Step 1", "### Step 1", "Step 1:", "Response:", "Output:"];

/// The sanitised instruction (possibly empty).
pub fn sanitize(raw: &str) -> String {
    let mut text = raw.trim();
    if let Some(at) = ANSWER_MARKERS.iter().filter_map(|m| text.find(m)).min() {
        text = text[..at].trim_end();
    }
    loop {
        let before = text;
        text = strip_numbering(text);
        text = strip_prefix_label(text);
        if text == before {
            break;
        }
    }
    text.trim().to_string()
}

/// "1. ", "2) ", "#3 ", "- ", "* " at the start.
fn strip_numbering(text: &str) -> &str {
    let t = text.trim_start();
    if let Some(rest) = t.strip_prefix(['-', '*', '•']) {
        return rest.trim_start();
    }
    let t2 = t.strip_prefix('#').unwrap_or(t);
    let digits = t2.chars().take_while(char::is_ascii_digit).count();
    if digits > 0 {
        let rest = &t2[digits..];
        if let Some(rest) = rest.strip_prefix(['.', ')', ':']) {
            return rest.trim_start();
        }
    }
    t
}

/// "Task:", "Question 1:", "Q1:", "Instruction -" at the start.
fn strip_prefix_label(text: &str) -> &str {
    let lower = text.to_ascii_lowercase();
    for prefix in PREFIXES {
        if !lower.starts_with(prefix) {
            continue;
        }
        let rest = &text[prefix.len()..];
        let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ');
        if let Some(rest) = rest.strip_prefix([':', '-']) {
            return rest.trim_start();
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_numbering_and_labels_and_cuts_self_answers() {
        assert_eq!(sanitize("1. Task: Write a haiku."), "Write a haiku.");
        assert_eq!(sanitize("Question 1: What is 2+2? Answer: 4"), "What is 2+2?");
        assert_eq!(sanitize("Q1: Solve x^2=4. ## Step 1: factor"), "Solve x^2=4.");
        assert_eq!(sanitize("  - Explain recursion  "), "Explain recursion");
        assert_eq!(sanitize("Queue or stack: which is FIFO?"), "Queue or stack: which is FIFO?");
        assert_eq!(sanitize("Answer: 4"), "");
    }
}
