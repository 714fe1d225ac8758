"""Small copies of the seven benchmarks in their real hub schemas and file layouts, with canned responses.

`write_all(root)` writes DATA_ROOT the way `hf download` lays the hub repositories out (images
embedded as parquet `Image` columns, generated with PIL). `CASES[benchmark]` lists (sample id, response,
expected correct) triples whose expectations follow the rules of docs/evaluation.md, worked out by hand;
the first case of each sample is its "canned" response for whole-file scoring.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def image(seed: int, size=(96, 72)) -> Image.Image:
    canvas = Image.new("RGB", size, (255 - 20 * seed % 255, 240, 200 + seed % 50))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([8 + seed, 8, 40 + seed, 40], outline=(seed * 30 % 255, 0, 0), width=3)
    draw.text((50, 20), str(seed), fill=(0, 0, 0))
    return canvas


def _write(rows: list[dict], features: dict, path: Path) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=datasets.Features(features)).to_parquet(str(path))


def _S():
    from datasets import Value

    return Value("string")


def write_mathvista(root: Path) -> None:
    from datasets import Image as ImageFeature
    from datasets import List, Value

    S = _S()
    def row(pid, qtype, atype, answer, choices=None, precision=None, task="math word problem"):
        query = f"Hint: answer it.\nQuestion: question {pid}?" + (
            "\nChoices:\n" + "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices)) if choices else "")
        return {"pid": pid, "question": f"question {pid}?", "image": f"images/{pid}.jpg",
                "decoded_image": image(int(pid)),
                "choices": choices, "unit": None, "precision": precision, "answer": answer, "question_type": qtype,
                "answer_type": atype, "metadata": {"task": task, "skills": ["arithmetic reasoning"]}, "query": query}
    rows = [row("1", "multi_choice", "text", "5 cm", ["3 cm", "5 cm", "7 cm", "9 cm"], task="geometry problem solving"),
            row("2", "free_form", "integer", "12"),
            row("3", "free_form", "float", "1.5", precision=1.0),
            row("4", "free_form", "text", "Yes")]
    features = {"pid": S, "question": S, "image": S, "decoded_image": ImageFeature(), "choices": List(S), "unit": S,
                "precision": Value("float64"), "answer": S, "question_type": S, "answer_type": S,
                "metadata": {"task": S, "skills": List(S)}, "query": S}
    _write(rows, features, root / "mathvista" / "data" / "testmini-00000-of-00001.parquet")


def write_mathvision(root: Path) -> None:
    from datasets import Image as ImageFeature
    from datasets import List, Value

    S = _S()
    def row(i, question, options, answer, subject="algebra"):
        return {"id": str(i), "question": question, "options": options, "image": f"images/{i}.jpg",
                "decoded_image": image(i), "answer": answer, "solution": "", "level": 2, "subject": subject}
    rows = [row(1, "<image1>Which fraction is shaded?", ["1/2", "2/3", "3/4", "4/5", "5/6"], "C"),
            row(2, "<image1>What is x?", [], "0.5", "analytic geometry"),
            row(3, "How long is the side?", [], "12"),
            row(4, "<image1>Find sin(60).", [], "\\frac{\\sqrt{3}}{2}", "metric geometry - angle")]
    features = {"id": S, "question": S, "options": List(S), "image": S, "decoded_image": ImageFeature(), "answer": S,
                "solution": S, "level": Value("int64"), "subject": S}
    _write(rows, features, root / "mathvision" / "data" / "test-00000-of-00001.parquet")


def write_mathverse(root: Path) -> None:
    from datasets import Image as ImageFeature

    S = _S()
    rows = []
    problems = [("1", "multi-choice", "B", "plane geometry"), ("2", "free-form", "60°", "plane geometry"),
                ("3", "free-form", "2\\sqrt{3}", "functions")]
    for index, (problem, qtype, answer, subject) in enumerate(problems):
        for version in ("Text Dominant", "Vision Only"):
            rows.append({
                "sample_index": str(2 * index + (version == "Vision Only") + 1), "problem_index": problem,
                "problem_version": version, "question": "" if version == "Vision Only" else f"problem {problem}",
                "image": image(10 + index), "answer": answer, "question_type": qtype,
                "metadata": {"split": "testmini", "source": "GeoQA", "subject": subject, "subfield": "angle"},
                "query_wo": "According to the question shown in the image, directly answer the question.",
                "query_cot": "According to the question shown in the image, think step by step.",
                "question_for_eval": f"problem {problem}"})
    features = {"sample_index": S, "problem_index": S, "problem_version": S, "question": S, "image": ImageFeature(),
                "answer": S, "question_type": S, "metadata": {"split": S, "source": S, "subject": S, "subfield": S},
                "query_wo": S, "query_cot": S, "question_for_eval": S}
    _write(rows, features, root / "mathverse" / "testmini.parquet")
    # the hub repository also holds the same split as json (image paths into images.zip) and a text-only
    # config: neither may be read as the vision-only split
    import json

    without_image = [{k: v for k, v in r.items() if k != "image"} for r in rows]
    (root / "mathverse" / "testmini.json").write_text(json.dumps(without_image))
    text_only = [{**rows[0], "sample_index": "99", "problem_version": "Vision Only"}]
    _write(text_only, features, root / "mathverse" / "testmini_text_only.parquet")


def _mmmu_features(num_images=7):
    from datasets import Image as ImageFeature

    S = _S()
    features = {"id": S, "question": S, "options": S, "explanation": S}
    features.update({f"image_{k}": ImageFeature() for k in range(1, num_images + 1)})
    features.update({"img_type": S, "answer": S, "topic_difficulty": S, "question_type": S, "subfield": S})
    return features


def _mmmu_row(id_, question, options, answer, qtype, images):
    row = {"id": id_, "question": question, "options": repr(options), "explanation": "", "img_type": "['Diagrams']",
           "answer": answer, "topic_difficulty": "Easy", "question_type": qtype, "subfield": "x"}
    row.update({f"image_{k}": images.get(k) for k in range(1, 8)})
    return row


def write_mmmu(root: Path) -> None:
    features = _mmmu_features()
    math = [_mmmu_row("validation_Math_1", "How many sides does <image 1> have?", ["2", "4", "6", "8"], "B",
                      "multiple-choice", {1: image(21)}),
            _mmmu_row("validation_Math_2", "Compare <image 1> with <image 2>: what is the sum?", [], "24", "open",
                      {1: image(22), 2: image(23)}),
            _mmmu_row("validation_Math_3", "Which is larger?", ["<image 1>", "<image 2>"], "A", "multiple-choice",
                      {1: image(24), 2: image(25), 3: image(26)})]
    art = [_mmmu_row("validation_Art_1", "<image 1> Give the ratio.", [], "['3.5', '7/2']", "open", {1: image(27)})]
    _write(math, features, root / "mmmu" / "Math" / "validation-00000-of-00001.parquet")
    _write(art, features, root / "mmmu" / "Art" / "validation-00000-of-00001.parquet")
    dev = [_mmmu_row("dev_Art_1", "<image 1> unused", ["a", "b"], "A", "multiple-choice", {1: image(28)})]
    _write(dev, features, root / "mmmu" / "Art" / "dev-00000-of-00001.parquet")


def write_mmmu_pro(root: Path) -> None:
    from datasets import Image as ImageFeature

    S = _S()
    features = _mmmu_features()
    features["subject"] = features.pop("subfield")
    standard = []
    for i, answer in ((1, "J"), (2, "C")):
        row = _mmmu_row(f"test_Math_{i}", f"<image 1> Pick the value {i}.", [str(v) for v in range(10)], answer,
                        "multiple-choice", {1: image(30 + i)})
        row["subject"] = row.pop("subfield")
        standard.append(row)
    _write(standard, features, root / "mmmu_pro" / "standard (10 options)" / "test-00000-of-00001.parquet")
    vision = [{"id": f"test_Art_{i}", "image": image(40 + i), "options": repr(["a", "b", "c", "d"]), "answer": a,
               "subject": "Art"} for i, a in ((1, "C"), (2, "A"))]
    _write(vision, {"id": S, "image": ImageFeature(), "options": S, "answer": S, "subject": S},
           root / "mmmu_pro" / "vision" / "test-00000-of-00001.parquet")


def write_mmstar(root: Path) -> None:
    from datasets import Image as ImageFeature
    from datasets import Value

    S = _S()
    rows = [{"index": i, "question": "Which shape is shown?\nOptions: A: circle, B: square, C: triangle, D: star",
             "image": image(50 + i), "answer": "B", "category": category, "l2_category": "shape",
             "meta_info": {"source": "x", "split": "val", "image_path": f"{i}.jpg"}}
            for i, category in ((0, "coarse perception"), (1, "math"), (2, "math"))]
    features = {"index": Value("int64"), "question": S, "image": ImageFeature(), "answer": S, "category": S,
                "l2_category": S, "meta_info": {"source": S, "split": S, "image_path": S}}
    _write(rows, features, root / "mmstar" / "mmstar.parquet")


HALLUSION_ROWS = [  # (category, subcategory, visual_input, set, figure, question, gt)
    ("VD", "illusion", "1", "0", "0", "0", "1"),
    ("VD", "illusion", "1", "0", "0", "1", "0"),
    ("VD", "illusion", "2", "0", "1", "0", "0"),
    ("VD", "illusion", "2", "0", "1", "1", "0"),
    ("VS", "math", "1", "0", "0", "0", "1"),
    ("VD", "math", "1", "0", "0", "0", "1"),
]


def hallusion_id(row) -> str:
    category, subcategory, _, set_id, figure, question, _ = row
    return f"{category}_{subcategory}_{set_id}_{figure}_{question}"


def write_hallusionbench(root: Path) -> None:
    from datasets import Image as ImageFeature

    S = _S()
    rows = [{"category": c, "subcategory": s, "visual_input": v, "set_id": st, "figure_id": f, "sample_note": "",
             "question_id": q, "question": f"Is statement {q} true for figure {f}?", "gt_answer_details": "",
             "gt_answer": gt, "filename": f"{c}/{s}/{st}_{f}.png", "image": image(60 + i)}
            for i, (c, s, v, st, f, q, gt) in enumerate(HALLUSION_ROWS)]
    features = {k: S for k in rows[0]}
    features["image"] = ImageFeature()
    _write(rows, features, root / "hallusionbench" / "data" / "image-00000-of-00001.parquet")


WRITERS = {"mathvista": write_mathvista, "mathvision": write_mathvision, "mathverse_vo": write_mathverse,
           "mmmu": write_mmmu, "mmmu_pro": write_mmmu_pro, "mmstar": write_mmstar,
           "hallusionbench": write_hallusionbench}


def write_all(root: Path) -> Path:
    for writer in WRITERS.values():
        writer(root)
    return root


_ill = [hallusion_id(r) for r in HALLUSION_ROWS]

# (sample id, response, expected correct). The first triple of each id is that sample's canned response.
CASES = {
    "mathvista": [
        ("1", "(B)", True), ("1", "The answer is 5 cm.", True), ("1", "B. 5 cm", True),
        ("1", "The answer is 5cm", True),  # no letter, no exact option text: nearest option by edit distance
        ("1", "<think>3 or 5?</think><answer>B</answer>", True), ("1", "<think>it is B", False),
        ("1", "It is A or B", False),
        ("2", "12", True), ("2", "The answer is 12.0", True), ("2", "\\boxed{12}", True), ("2", "11", False),
        ("2", "<think>12?</think>13", False),
        ("3", "\\boxed{\\frac{3}{2}}", True), ("3", "1.50", True), ("3", "3/2", True),
        ("3", "1.54", True),  # official MathVista rounds to the precision (1 decimal)
        ("3", "1.6", False),
        ("4", "yes", True), ("4", "No", False),
        ("2", "The answer is 12 because 5 and 7 make it", True),  # the number the cue states, not the last
        ("2", "\\boxed{\\infty}", False), ("2", "\\boxed{10^{1000}}", False),  # no int(): an answer, wrong
        ("4", "\\boxed{\\text{Yes}}", True),
    ],
    "mathvision": [
        ("1", "\\boxed{C}", True), ("1", "(C)", True), ("1", "The answer is 3/4", True), ("1", "\\boxed{D}", False),
        ("2", "The answer is 0.6", False), ("2", "\\boxed{\\frac{1}{2}}", True), ("2", "1/2", True),
        ("3", "\\boxed{12\\text{ cm}}", True), ("3", "12 cm", True), ("3", "The side is 13 cm long.", False),
        ("3", "The answer is 12x", False), ("3", "\\boxed{12 \\pi}", False),  # expressions, not 12 with a unit
        ("4", "0.8660254", True), ("4", "\\sqrt{3}/2", True), ("4", "\\frac{1}{2}", False),
    ],
    "mathverse_vo": [
        ("2", "B", True), ("2", "(B)", True), ("2", "The answer is C", False),
        ("4", "60", True), ("4", "\\boxed{60^\\circ}", True), ("4", "The angle is 50 degrees", False),
        ("6", "3.4641016", True), ("6", "2\\sqrt{3}", True), ("6", "\\sqrt{12}", True), ("6", "3.5", False),
    ],
    "mmmu": [
        ("validation_Math_1", "(B)", True), ("validation_Math_1", "B", True),
        ("validation_Math_1", "The correct option is B.", True),
        ("validation_Math_1", "The answer is (B) not (C)", False),  # several hits: the last one mentioned
        ("validation_Math_1", "4", False),  # option text counts only in answers longer than 5 words
        ("validation_Math_1", "I believe the count of sides equals 4 here", True),
        ("validation_Math_2", "The result is 24.", True), ("validation_Math_2", "so the sum is 24 units", True),
        ("validation_Math_2", "25", False),
        ("validation_Math_3", "A", True), ("validation_Math_3", "", False),
        ("validation_Art_1", "The ratio is 3.5", True), ("validation_Art_1", "7/2", True),
        ("validation_Art_1", "The ratio is 4", False),
        # numbers are equal when both round to the same 2 decimals (the official rule)
        ("validation_Art_1", "The ratio is 3.504", True), ("validation_Art_1", "The ratio is 3.53", False),
        ("validation_Math_1", "<think>4 sides</think><answer>\\boxed{B}</answer>", True),
    ],
    "mmmu_pro": [
        ("standard (10 options)/test_Math_1", "J", True), ("standard (10 options)/test_Math_1", "(I)", False),
        ("standard (10 options)/test_Math_2", "C", True),
        ("vision/test_Art_1", "Answer: C", True), ("vision/test_Art_1", "B", False),
        ("vision/test_Art_2", "B", False),
    ],
    "mmstar": [
        ("0", "B", True), ("0", "The answer is B.", True), ("0", "square", True), ("0", "(B)", True),
        ("0", "<answer>B</answer>", True),  # unwrapped by the harness rule (can_infer alone would fail)
        ("0", "A or B", False),
        # since VLMEvalKit #1175 the letter must be among the last 4 tokens; no option text either: failure
        ("0", "B because the figure clearly shows four equal sides and right angles everywhere", False),
        ("1", "C", False), ("1", "B", True),
        ("2", "D", False),
    ],
    "hallusionbench": [
        (_ill[0], "Yes, it is.", True), (_ill[0], "No.", False), (_ill[0], "yes and no", False),
        (_ill[1], "<think>hmm</think><answer>no</answer>", True), (_ill[1], "Yes", False),
        (_ill[2], "Yes", False), (_ill[2], "no", True),
        (_ill[3], "No, it is not.", True),
        (_ill[4], "yes", True),
        (_ill[5], "Unknown", False), (_ill[5], "Yes", True),
    ],
}
