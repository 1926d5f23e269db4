"""Writes data/eval/magpie-eval-80.parquet, `magpie eval`'s default prompt set: 80 prompts across
Magpie's 12 task categories, written for this project (not taken from AlpacaEval, Arena-Hard or
MT-Bench, whose prompts are theirs). Each row: uuid, instruction, task_category, source.

    .venv/bin/python scripts/make_eval_set.py
"""
import pathlib
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = {
    "Information seeking": [
        "What causes the seasons on Earth?",
        "How does a bill become a law in the United States?",
        "What is the difference between a virus and a bacterium?",
        "Why do onions make people cry when they are cut?",
        "What were the main causes of the fall of the Western Roman Empire?",
        "How do noise-cancelling headphones work?",
        "What is the role of mitochondria in a cell?",
    ],
    "Reasoning": [
        "A bat and a ball cost $1.10 in total. The bat costs $1.00 more than the ball. How much does the ball cost? Explain your reasoning.",
        "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies? Why?",
        "Three friends split a bill. Anna paid twice what Ben paid, and Ben paid $5 more than Cleo. The bill was $75. How much did each pay?",
        "A clock shows 3:15. What is the angle between the hour and minute hands?",
        "You have two ropes that each take exactly one hour to burn, but burn unevenly. How can you measure 45 minutes?",
        "Is the statement 'This sentence is false' true or false? Discuss.",
        "If it takes 5 machines 5 minutes to make 5 widgets, how long would 100 machines take to make 100 widgets?",
    ],
    "Planning": [
        "Plan a one-week study schedule for someone preparing for a statistics exam while working part-time.",
        "Outline the steps to organise a small community cleanup event in a city park.",
        "Create a plan for a family of four to move to a new city within two months.",
        "Help me plan a vegetarian dinner party for eight people with a budget of $120.",
        "Draft a 30-day plan to start running regularly for a complete beginner.",
        "Plan a two-day itinerary for a first visit to Kyoto.",
        "What steps should a small bakery take to start selling online?",
    ],
    "Editing": [
        "Rewrite this sentence to be more concise: 'Due to the fact that the meeting was running late, we made the decision to postpone the presentation until a later date.'",
        "Correct the grammar: 'Me and him goes to the store yesterday and buyed three apple.'",
        "Make this email more polite: 'Send me the report now. It is late.'",
        "Turn this passive paragraph into active voice: 'The cake was eaten by the children. The mess was cleaned up by their parents.'",
        "Shorten this to one sentence: 'Our product is fast. It is also reliable. Customers like that it is easy to use.'",
        "Rewrite 'The quarterly numbers were not good' in a neutral, professional tone for investors.",
        "Proofread and fix: 'Their going to announce the winner's tomorow, so dont be late.'",
    ],
    "Coding & Debugging": [
        "Write a Python function that returns the n-th Fibonacci number iteratively.",
        "Why does this Python code print 3 three times? `fs = [lambda: i for i in range(3)]; [print(f()) for f in fs]`",
        "Write a SQL query that returns the five customers with the highest total order value from tables customers(id, name) and orders(customer_id, amount).",
        "Explain the difference between a list and a tuple in Python, with an example of when to use each.",
        "Write a JavaScript function that removes duplicate values from an array while keeping their order.",
        "Fix the bug: `def mean(xs): return sum(xs) / len(xs)` crashes on an empty list. Propose a better version.",
        "Write a bash one-liner that counts the lines of all .rs files in a directory tree.",
    ],
    "Math": [
        "Solve for x: 3x + 7 = 22.",
        "What is the derivative of sin(x) * x^2?",
        "A rectangle has a perimeter of 30 cm and a length twice its width. What is its area?",
        "What is the probability of rolling two dice and getting a sum of 7?",
        "Compute the sum of the integers from 1 to 200.",
        "Integrate 2x * e^(x^2) with respect to x.",
        "Is 221 a prime number? Show your work.",
    ],
    "Role playing": [
        "You are a medieval innkeeper. Greet a tired traveller who has just arrived in a storm.",
        "Pretend you are a tour guide at the Louvre and introduce the Mona Lisa to a group of children.",
        "Act as a job interviewer for a junior data analyst role and ask your first three questions.",
        "You are a ship's captain in the 1700s. Describe the morning routine aboard your ship.",
        "Play a friendly librarian helping a teenager find a first science-fiction book.",
        "You are a chef on a cooking show. Explain how to make a simple omelette to the audience.",
    ],
    "Data analysis": [
        "A shop sold 120, 150, 90 and 180 units in four quarters. What are the mean and the median, and what trend do you see?",
        "How would you detect outliers in a dataset of house prices?",
        "Explain what a correlation of -0.8 between study hours and errors means.",
        "Given monthly website visits of 1000, 1200, 1500 and 1400, compute the month-over-month growth rates.",
        "What chart would you use to compare market share among five companies, and why?",
        "A/B test: version A converted 120 of 2400 visitors, version B 150 of 2500. Which did better, and what else would you check?",
    ],
    "Creative writing": [
        "Write a short poem about a lighthouse keeper's last night on duty.",
        "Write the opening paragraph of a mystery story set in a snowed-in train station.",
        "Write a limerick about a cat who learns to code.",
        "Describe a bustling market in a city on Mars, in about 100 words.",
        "Write a letter from a tree to the person who planted it fifty years ago.",
        "Write a two-sentence horror story about a smart fridge.",
        "Write a short fable that teaches patience, with animals as characters.",
    ],
    "Advice seeking": [
        "How can I stay focused while working from home?",
        "I have a job offer with higher pay but a longer commute. How should I decide?",
        "What are good ways to start saving money on a small salary?",
        "How do I give constructive feedback to a colleague without hurting their feelings?",
        "What should I consider before adopting a dog?",
        "How can I improve my sleep if I often wake up at night?",
        "I get nervous before public speaking. What can I do?",
    ],
    "Brainstorming": [
        "Give me ten names for a coffee shop that also sells books.",
        "Suggest creative ways to reuse glass jars at home.",
        "Brainstorm themes for a school science fair.",
        "List ideas for a weekend project that teaches kids about electricity.",
        "What are some unusual ways to celebrate a friend's birthday on a budget?",
        "Brainstorm features for an app that helps people reduce food waste.",
    ],
    "Others": [
        "Tell me a fun fact about octopuses.",
        "What is a good way to remember the order of the planets?",
        "Translate 'Where is the train station?' into French and Spanish.",
        "Summarise the plot of Romeo and Juliet in three sentences.",
        "What is the origin of the word 'salary'?",
        "Recommend three classic board games for a family evening and say why.",
    ],
}

rows = [(category, prompt) for category, prompts in PROMPTS.items() for prompt in prompts]
assert len(rows) == 80, len(rows)
namespace = uuid.UUID("6ba7b812-9dad-11d1-80b4-00c04fd430c8")
table = pa.table({
    "uuid": [str(uuid.uuid5(namespace, f"magpie-eval-80:{i}")) for i in range(len(rows))],
    "instruction": [prompt for _, prompt in rows],
    "task_category": [category for category, _ in rows],
    "source": ["magpie-eval-80: written for the magpie project"] * len(rows),
})
out = pathlib.Path(__file__).resolve().parent.parent / "data" / "eval" / "magpie-eval-80.parquet"
out.parent.mkdir(parents=True, exist_ok=True)
pq.write_table(table, out)
print(f"{out}: {len(rows)} prompts in {len(PROMPTS)} categories")
