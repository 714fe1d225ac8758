"""VLMEvalKit's answer-judge prompts, character for character (open-compass/VLMEvalKit, Apache-2.0).

The judge model is asked only to *extract* an answer; `megatron_avar.eval.judge` then grades its reply with
the benchmark's own rules. The prompts are reproduced exactly, typos included ("Model respone",
"Your should output"), because the judge's replies, and so the scores, depend on them:

- :func:`math_extraction_prompt` — ``MathVista_auxeval`` (vlmeval/dataset/utils/mathvista.py) and
  ``MATH_V_auxeval`` (mathv.py): five in-context examples, then the benchmark's question and the response.
  MathVision's examples differ from MathVista's only in their hint lines (``style="mathvision"``).
- :func:`mathverse_extraction_prompt` — ``MathVerse_auxeval_extract`` (mathverse.py), six examples, the response
  only. (MathVerse's second GPT call, the 0/1 scoring, is not used: our rules grade the extraction.)
- :func:`multiple_choice_prompt` — ``build_prompt`` / ``build_option_str`` (multiple_choice.py, also used for
  MMMU, MMMU-Pro, MMStar): the judge maps the answer to an option letter, or Z.
- :func:`yes_no_prompt` — ``YOrN_match_prompt`` (yorn.py, HallusionBench): Yes, No or Unknown.

:data:`PROMPT_VERSION` is part of every judge request's cache key: change it whenever a prompt here changes.
"""

from __future__ import annotations

__all__ = ["PROMPT_VERSION", "math_extraction_prompt", "mathverse_extraction_prompt", "multiple_choice_prompt",
           "yes_no_prompt"]

PROMPT_VERSION = "vlmevalkit-2026-08"

_MATH_TASK = ("\nPlease read the following example.\n"
              "Then extract the answer from the model response and type it at the end of the prompt.\n\n")

# (MathVista hint, MathVision hint, question, choices or None, model response, extracted answer)
_MATH_EXAMPLES = (
    ("Hint: Please answer the question requiring an integer answer and provide the final value,\ne.g., 1, 2, 3, "
     "at the end.",
     "Hint: Please answer the question and provide the final answer at the end.",
     "Which number is missing?", None, "The number missing in the sequence is 14.", "14"),
    ("Hint: Please answer the question requiring a floating-point number with one decimal place and provide the "
     "final value,\ne.g., 1.2, 1.3, 1.4, at the end.",
     "Hint: Please answer the question and provide the final answer at the end.",
     "What is the fraction of females facing the camera?", None,
     "The fraction of females facing the camera is 0.6,\nwhich means that six out of ten females in the group are "
     "facing the camera.", "0.6"),
    ("Hint: Please answer the question requiring a floating-point number with two decimal places and provide the "
     "final value,\ne.g., 1.23, 1.34, 1.45, at the end.",
     "Hint: Please answer the question and provide the final answer at the end.",
     "How much money does Luca need to buy a sour apple candy and a butter-scotch candy? (Unit: $)", None,
     "Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.", "1.45"),
    ("Hint: Please answer the question requiring a Python list as an answer and provide the final list,\ne.g., "
     "[1, 2, 3], [1.2, 1.3, 1.4], at the end.",
     "Hint: Please answer the question and provide the final answer at the end.",
     "Between which two years does the line graph saw its maximum peak?", None,
     "The line graph saw its maximum peak between 2007 and 2008.", "[2007, 2008]"),
    ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
     "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
     "What fraction of the shape is blue?", "(A) 3/11 (B) 8/11 (C) 6/11 (D) 3/5",
     "The correct answer is (B) 8/11.", "B"),
)


def _math_example(hint: str, question: str, choices: str | None, response: str, extracted: str) -> str:
    lines = [hint, f"Question: {question}", *([f"Choices: {choices}"] if choices else []),
             f"Model response: {response}"]
    return "\n" + "".join(line + "\n\n" for line in lines) + f"Extracted answer: {extracted}\n"


def math_extraction_prompt(question: str, response: str, *, style: str = "mathvista") -> str:
    """MathVista's (``style="mathvista"``) or MathVision's (``"mathvision"``) extraction prompt. question: the
    benchmark's prompt text (hint, question, choices); response: the model's answer text. VLMEvalKit puts no
    newline between the response and "Extracted answer:"; neither do we."""
    if style not in ("mathvista", "mathvision"):
        raise ValueError(f"style must be 'mathvista' or 'mathvision', got {style!r}")
    examples = "".join(_math_example(vista_hint if style == "mathvista" else vision_hint, example_question, choices,
                                     example_response, extracted) + "\n"
                       for vista_hint, vision_hint, example_question, choices, example_response, extracted
                       in _MATH_EXAMPLES)
    return f"{_MATH_TASK}{examples}{question}\nModel respone: {response}Extracted answer:"


_MATHVERSE_TASK = ("\nI am providing you a response from a model to a math problem, termed 'Model Response'. You "
                   "should extract the answer from the response as 'Extracted Answer'. Directly output the extracted "
                   "answer with no explanation.\n\n\n")

_MATHVERSE_EXAMPLES = (
    "\n1.\nModel response: 'Rounded to two decimal places, the perimeter of the sector is approximately:\n\n(-2, 1)'"
    "\nExtracted Answer: (-2, 1)\n",
    "\n2.\nModel response: 'at those points.\n\nTherefore, the correct option that represents the meaning of the "
    "intersection points of the graphs is:\n\nD. They give the solutions to the equation $f(t)=g(t)$.\",'\n"
    "Extracted Answer: D\n",
    "\n3.\nModel response: ' at 1 (there's a closed circle at y = 1), the range in interval notation is "
    "\\((-4, 1]\\).\n\nFinal values:\nDomain: \\((-3, 3]\\)\nRange: \\((-4, 1]\\)'\n"
    "Extracted Answer: Domain: \\((-3, 3]\\)\nRange: \\((-4, 1]\\)\n",
    "\n4.\nModel response: 'As it stands, I cannot provide the correct option letter because there isn't enough "
    "information to solve for 'y'.'\nExtracted Answer: null\n",
    "\n5.\nModel response: 'Given that AB = 17.6 meters, we can now substitute into the equation:\n\n"
    "d = 17.6 / cos(38\u00b0)\n\nTherefore, to one decimal place, the distance d between Ned and Bart is "
    "approximately 22.3 meters.'\nExtracted answer: 22.3\n",
    "\n6.\nModel response:  have all the coefficients for the quadratic function:\n\\( f(x) = ax^2 + bx + c \\)\n"
    "\\( f(x) = -1x^2 - 2x + 1 \\)\n\nTherefore, the equation for the graphed function \\( f \\) is:\n"
    "\\( f(x) = -x^2 - 2x + 1 \\)\"'\nExtracted answer: f(x) = -x^2 - 2x + 1\n",
)


def mathverse_extraction_prompt(response: str) -> str:
    """MathVerse's extraction prompt (the response only; "null" is its reply for no answer)."""
    examples = "".join(example + "\n\n" for example in _MATHVERSE_EXAMPLES)
    return f"{_MATHVERSE_TASK}{examples}7.\nModel response: '{response}'\nExtracted Answer: "


_MCQ_TEMPLATE = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice question. "
    "You are provided with a question, several options, and an answer, and you need to find which option is most "
    "similar to the answer. If the meaning of all options are significantly different from the answer, output Z. "
    "Your should output a single uppercase character in A, B, C, D (if they are valid options), and Z. \n"
    "Example 1: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3: \n"
    "Question: {question}?\nOptions: {options}\nAnswer: {response}\nYour output: "
)


def multiple_choice_prompt(question: str, options: dict[str, str], response: str) -> str:
    """The multiple-choice matching prompt. options: letter -> option text (empty texts are left out, as
    VLMEvalKit leaves out missing option columns)."""
    listed = "There are several options: \n" + "".join(f"{k}. {v}\n" for k, v in options.items() if str(v).strip())
    return _MCQ_TEMPLATE.format(question=question, options=listed, response=response)


_YES_NO_TEMPLATE = (
    "You are an AI assistant who will help me to match an answer with two options of a question. "
    "The options are only Yes / No. "
    "You are provided with a question and an answer, and you need to find which option (Yes / No) is most similar "
    "to the answer. If the meaning of all options are significantly different from the answer, output Unknown. "
    "Your should output a single word among the following 3 choices: Yes, No, Unknown.\n"
    "Example 1: \n"
    "Question: Is the word in this image 'Hello'?\nAnswer: The word in this image is 'Hello'.\nYour output: Yes\n"
    "Example 2: \n"
    "Question: Is the word in this image 'Hello'?\nAnswer: The word in this image is not 'Hello'.\nYour output: No\n"
    "Example 3: \n"
    "Question: {question}?\nAnswer: {response}\nYour output: "
)


def yes_no_prompt(question: str, response: str) -> str:
    """The Yes/No matching prompt (VLMEvalKit appends "?" to the question even when it ends in one)."""
    return _YES_NO_TEMPLATE.format(question=question, response=response)
