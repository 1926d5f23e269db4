//! The judge's prompts and how its answers are read. The prompts are MT-Bench's (`pair-v2` for
//! pairwise comparison, `single-v1` for 1–10 grades), which Arena-Hard and AlpacaEval style
//! judging follow: an explanation first, then a verdict in double brackets. Parsing takes the
//! last bracketed verdict in the text; a text without one is unparsable and counted, never
//! guessed.

use super::stats::Verdict;
use crate::data::Message;

const PAIR_SYSTEM: &str = "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the user question displayed below. You should choose the assistant that follows the user's instructions and answers the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the order in which the responses were presented does not influence your decision. Do not allow the length of the responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as possible. After providing your explanation, output your final verdict by strictly following this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.";

/// What `--verdict-first` starts the judge's reply with.
pub const PAIR_PREFILL: &str = "Final verdict: [[";
pub const GRADE_PREFILL: &str = "Rating: [[";

const GRADE_SYSTEM: &str = "You are a helpful assistant.";
const GRADE_INSTRUCTION: &str = "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".";

/// The conversation as the judge reads it: the user turns and one assistant's answers.
fn transcript(questions: &[String], answers: &[String], who: &str) -> String {
    if questions.len() == 1 {
        return format!("[The Start of {who}'s Answer]\n{}\n[The End of {who}'s Answer]", answers.first().map_or("", String::as_str));
    }
    let mut text = format!("<|The Start of {who}'s Conversation with User|>\n\n");
    for (q, a) in questions.iter().zip(answers) {
        text += &format!("### User:\n{q}\n\n### {who}:\n{a}\n\n");
    }
    text + &format!("<|The End of {who}'s Conversation with User|>")
}

/// The judge's conversation comparing answers `a` (shown first) and `b`.
pub fn pairwise(questions: &[String], a: &[String], b: &[String]) -> Vec<Message> {
    let question = if questions.len() == 1 { format!("[User Question]\n{}\n\n", questions[0]) } else { String::new() };
    let user = format!("{question}{}\n\n{}", transcript(questions, a, "Assistant A"), transcript(questions, b, "Assistant B"));
    vec![Message::new("system", PAIR_SYSTEM), Message::new("user", user)]
}

/// The judge's conversation grading `answers`.
pub fn grading(questions: &[String], answers: &[String]) -> Vec<Message> {
    let question = if questions.len() == 1 { format!("[Question]\n{}\n\n", questions[0]) } else { String::new() };
    let user = format!("[Instruction]\n{GRADE_INSTRUCTION}\n\n{question}{}", transcript(questions, answers, "Assistant"));
    vec![Message::new("system", GRADE_SYSTEM), Message::new("user", user)]
}

/// The last `[[A]]`, `[[B]]` or `[[C]]` in a pairwise judgement.
pub fn parse_verdict(text: &str) -> Option<Verdict> {
    [("[[A]]", Verdict::First), ("[[B]]", Verdict::Second), ("[[C]]", Verdict::Tie)]
        .iter()
        .filter_map(|(mark, verdict)| text.rfind(mark).map(|at| (at, *verdict)))
        .max_by_key(|(at, _)| *at)
        .map(|(_, verdict)| verdict)
}

/// The last `[[n]]` in a grade (MT-Bench's pattern; `[n]` when no double brackets are there), if
/// it lies in 1–10.
pub fn parse_grade(text: &str) -> Option<f64> {
    let numbers = |open: &str, close: &str| -> Option<f64> {
        let mut found = None;
        let mut rest = text;
        while let Some(start) = rest.find(open) {
            let after = &rest[start + open.len()..];
            if let Some(end) = after.find(close) {
                if let Ok(value) = after[..end].trim().parse::<f64>() {
                    found = Some(value);
                }
            }
            rest = after;
        }
        found
    };
    numbers("[[", "]]").or_else(|| numbers("[", "]")).filter(|v| (1.0..=10.0).contains(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_from_real_judge_outputs_and_broken_ones_are_not_guessed() {
        let real = "Assistant A gives a correct, concise list while Assistant B repeats itself.\n\nFinal verdict: [[A]]";
        assert_eq!(parse_verdict(real), Some(Verdict::First));
        assert_eq!(parse_verdict("Both answers are equally helpful. [[C]]"), Some(Verdict::Tie));
        assert_eq!(parse_verdict("A mentions [[A]] format, but my final verdict is [[B]]"), Some(Verdict::Second), "the last verdict counts");
        for broken in ["Assistant A is better.", "[A]", "[[D]]", "", "[[a]]"] {
            assert_eq!(parse_verdict(broken), None, "{broken:?}");
        }
    }

    #[test]
    fn grades_are_read_on_the_one_to_ten_scale_only() {
        assert_eq!(parse_grade("The answer is accurate but short. Rating: [[7]]"), Some(7.0));
        assert_eq!(parse_grade("Rating: [[8.5]]"), Some(8.5));
        assert_eq!(parse_grade("Rating: [6]"), Some(6.0), "single brackets as MT-Bench's backup pattern");
        assert_eq!(parse_grade("first [[3]] then [[9]]"), Some(9.0));
        for broken in ["Rating: 7", "Rating: [[11]]", "[[0]]", "[[seven]]", "Rating: [[", ""] {
            assert_eq!(parse_grade(broken), None, "{broken:?}");
        }
    }

    #[test]
    fn the_pairwise_prompt_shows_both_answers_in_the_order_given() {
        let q = vec!["Name a prime.".to_string()];
        let messages = pairwise(&q, &["2".into()], &["9".into()]);
        let user = &messages[1].content;
        assert!(user.starts_with("[User Question]\nName a prime."));
        assert!(user.find("Assistant A's Answer]\n2").unwrap() < user.find("Assistant B's Answer]\n9").unwrap());
        let two_turns = pairwise(&["Hi".into(), "And?".into()], &["a1".into(), "a2".into()], &["b1".into(), "b2".into()]);
        assert!(two_turns[1].content.contains("### User:\nAnd?\n\n### Assistant B:\nb2"));
        assert!(grading(&q, &["2".into()])[1].content.contains("Rating: [[5]]"));
    }
}
