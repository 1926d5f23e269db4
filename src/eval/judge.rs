//! The judge's prompts and how its answers are read. The prompts are MT-Bench's (`pair-v2` for
//! pairwise comparison; for 1–10 grades of each turn `single-v1`, `single-v1-multi-turn` and,
//! with reference answers for math, reasoning and coding, `single-math-v1` and
//! `single-math-v1-multi-turn`), which Arena-Hard and AlpacaEval style judging follow: an
//! explanation first, then a verdict in double brackets. Parsing takes the
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

/// MT-Bench's later-turn grading (`single-v1-multi-turn`): its system prompt, verbatim.
const GRADE_MULTI_TURN: &str = "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. You evaluation should focus on the assistant's answer to the second user question. Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n";
/// `single-math-v1`'s instruction: the first turn graded against a reference answer.
const GRADE_REFERENCE_INSTRUCTION: &str = "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question displayed below. Your evaluation should consider correctness and helpfulness. You will be given a reference answer and the assistant's answer. Begin your evaluation by comparing the assistant's answer with the reference answer. Identify and correct any mistakes. Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".";
/// `single-math-v1-multi-turn`'s system prompt.
const GRADE_REFERENCE_MULTI_TURN: &str = "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question. Your evaluation should consider correctness and helpfulness. You will be given a reference answer and the assistant's answer. You evaluation should focus on the assistant's answer to the second question. Begin your evaluation by comparing the assistant's answer with the reference answer. Identify and correct any mistakes. Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n";

/// MT-Bench's categories whose questions are graded against their reference answers.
pub const REFERENCE_CATEGORIES: &[&str] = &["math", "reasoning", "coding"];

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

/// The judge's conversation grading the answer to user turn `turn` (0-based), as MT-Bench's
/// single-answer grading does: the first turn alone (`single-v1`), a later one with the
/// conversation up to it (`single-v1-multi-turn`, which names the second question; a third or
/// later turn is called the last). `reference` holds the reference answers the judge is shown
/// (the `single-math-v1` prompts), or is empty; it needs one for every turn up to `turn`.
pub fn grading(questions: &[String], answers: &[String], reference: &[String], turn: usize) -> Vec<Message> {
    let with_reference = reference.len() > turn;
    if turn == 0 {
        let instruction = if with_reference { GRADE_REFERENCE_INSTRUCTION } else { GRADE_INSTRUCTION };
        let mut user = format!("[Instruction]\n{instruction}\n\n[Question]\n{}\n\n", questions[0]);
        if with_reference {
            user += &format!("[The Start of Reference Answer]\n{}\n[The End of Reference Answer]\n\n", reference[0]);
        }
        user += &format!("[The Start of Assistant's Answer]\n{}\n[The End of Assistant's Answer]", answers.first().map_or("", String::as_str));
        return vec![Message::new("system", GRADE_SYSTEM), Message::new("user", user)];
    }
    let block = |title: &str, label: &str, replies: &[String]| {
        let mut text = format!("<|The Start of {title}|>\n\n");
        for (q, a) in questions.iter().zip(replies).take(turn + 1) {
            text += &format!("### User:\n{q}\n\n### {label}:\n{a}\n\n");
        }
        text + &format!("<|The End of {title}|>")
    };
    let mut user = String::new();
    if with_reference {
        user += &block("Reference Answer", "Reference answer", reference);
        user += "\n\n\n";
    }
    user += &block("Assistant A's Conversation with User", "Assistant A", answers);
    let system = if with_reference { GRADE_REFERENCE_MULTI_TURN } else { GRADE_MULTI_TURN };
    let system = if turn == 1 { system.to_string() } else { system.replace("the second user question", "the last user question").replace("the second question", "the last question") };
    vec![Message::new("system", system), Message::new("user", user)]
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
            if let Some(end) = after.find(close)
                && let Ok(value) = after[..end].trim().parse::<f64>()
            {
                found = Some(value);
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
        assert!(grading(&q, &["2".into()], &[], 0)[1].content.contains("Rating: [[5]]"));
    }

    /// MT-Bench's four single-grading prompts, as FastChat's judge_prompts.jsonl formats them.
    #[test]
    fn each_turn_is_graded_with_mt_bench_s_prompt_and_references_where_given() {
        let (q, a, r) = (["What is 3+4?".to_string(), "Times 5?".to_string()], ["7".to_string(), "35".to_string()], ["7".to_string(), "35".to_string()]);
        let first = grading(&q, &a, &[], 0);
        assert_eq!(first[0].content, "You are a helpful assistant.");
        assert!(first[1].content.ends_with("[Question]\nWhat is 3+4?\n\n[The Start of Assistant's Answer]\n7\n[The End of Assistant's Answer]"));
        let first_math = grading(&q, &a, &r, 0);
        assert!(first_math[1].content.contains("You will be given a reference answer and the assistant's answer."));
        assert!(first_math[1].content.contains("[The Start of Reference Answer]\n7\n[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n7"));
        let second = grading(&q, &a, &[], 1);
        assert!(second[0].content.contains("focus on the assistant's answer to the second user question") && second[0].content.ends_with("\n\n"));
        assert_eq!(second[1].content, "<|The Start of Assistant A's Conversation with User|>\n\n### User:\nWhat is 3+4?\n\n### Assistant A:\n7\n\n### User:\nTimes 5?\n\n### Assistant A:\n35\n\n<|The End of Assistant A's Conversation with User|>");
        let second_math = grading(&q, &a, &r, 1);
        assert!(second_math[0].content.contains("focus on the assistant's answer to the second question"));
        assert!(second_math[1].content.starts_with("<|The Start of Reference Answer|>\n\n### User:\nWhat is 3+4?\n\n### Reference answer:\n7\n\n### User:\nTimes 5?\n\n### Reference answer:\n35\n\n<|The End of Reference Answer|>\n\n\n<|The Start of Assistant A's"));
        assert!(grading(&q, &a, &r[..1], 1)[0].content.contains("helpfulness, relevance"), "a reference for every turn graded, or none");
    }
}
