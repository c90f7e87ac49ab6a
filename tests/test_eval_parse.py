"""The option-letter parser: explicit answers are read, English words never are."""

import pytest

from drivekd.eval.parse import extract_choice, extract_yes_no, options_in_question

QUESTION = (
    "What is the moving status of object <c1,CAM_BACK,1088.3,497.5>? Please select the correct answer "
    "from the following options: A. Going ahead. B. Turn right. C. Turn left. D. Stopped."
)


@pytest.mark.parametrize(
    "text, expected",
    [
        # the forms models use
        ("Final: C.", "C"),
        ("C.", "C"),
        ("C", "C"),
        ("(C)", "C"),
        ("Answer: C", "C"),
        ("The answer is C", "C"),
        ("The answer is C.", "C"),
        ("C) Turn left.", "C"),
        ("C. Turn left, the car ahead signals.", "C"),
        ("**C**", "C"),
        ("Option C", "C"),
        ("I choose D.", "D"),
        ("B is correct because the light is red.", "B"),
        ("**Answer:** B", "B"),
        ("Final answer is: (D)", "D"),
        ("The correct option is **B**.", "B"),
        ("The answer is clearly C", "C"),
        ("Final: C. Turn left. Support: the ego lane bends left.", "C"),
        # lowercase only in explicit answer phrases
        ("answer: c", "C"),
        ("Answer: a", "A"),
        ("final: b. Support: ...", "B"),
        ("The answer is a.", "A"),
        ("option d", "D"),
        # the article "a" and the pronoun "I"
        ("There is a car in front", None),
        ("a pedestrian crosses, answer: B", "B"),
        ("A", "A"),
        ("A.", "A"),
        ("A. Going ahead.", "A"),
        ("a", None),  # bare lowercase letter: ambiguous with the article, so unanswerable
        ("a.", None),
        ("A car is ahead of the ego vehicle.", None),
        ("Answer: a truck is ahead", None),
        ("The answer is a car", None),
        ("Answer: A because the lane is clear", "A"),
        ("Answer: A Going ahead", "A"),
        ("Final: C. Support: a truck is ahead", "C"),
        ("I think", None),
        ("I think the vehicle is stopped.", None),
        # letters inside words, several letters, contradictions
        ("Cars and buses are parked.", None),
        ("Both A and B are wrong; the answer is C", "C"),
        ("Answer: A. On second thought, Answer: B.", "B"),  # the last answer statement wins
        ("option A or option B", None),  # different letters, no answer statement
        ("(A) or (B)", None),
        ("B. Option A is wrong because the car turns.", None),  # leading letter contradicted
        ("C. Turn left (option C).", "C"),  # markers that agree
        ("Either A or B could be right.", None),
        ("Answer: E", None),  # not an option of an A-D question
        ("", None),
        (None, None),
        ("The vehicle is turning left.", None),
        # The Drive-KD authors' own answer template (their data/demo.json).
        ("Final: {A. Going ahead.}", "A"),
        ("Final: {C. Turn left.} Support: the light ahead is red.", "C"),
        ("Final: {a truck is ahead}", None),  # the article, not option A
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_options_beyond_d_come_from_the_question():
    question = "Which? A. left B. right C. ahead D. stop E. reverse"
    assert options_in_question(question) == "ABCDE"
    assert extract_choice("Answer: E", options_in_question(question)) == "E"
    assert extract_choice("Answer: E") is None


def test_options_in_question():
    assert options_in_question(QUESTION) == "ABCD"
    assert options_in_question("Options: (A) x (B) y (C) z") == "ABC"
    assert options_in_question("Pick: A) x B) y") == "AB"
    assert options_in_question("What should the ego vehicle do?") == "ABCD"  # default
    assert options_in_question("No listing here", default="AB") == "AB"


def test_restricted_options_ignore_other_letters():
    assert extract_choice("Answer: C", "AB") is None
    assert extract_choice("Answer: B", "AB") == "B"


def test_yes_no():
    assert extract_yes_no("Yes, it is a traffic sign.") == "yes"
    assert extract_yes_no("No.") == "no"
    assert extract_yes_no("I believe so. Answer: no") == "no"
    assert extract_yes_no("Nothing is ahead") is None
    assert extract_yes_no("") is None
