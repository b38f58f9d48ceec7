"""Classification metrics from a confusion matrix of counts. Ranks sum their matrices (exact
integer counts), so the metrics of a distributed evaluation are those of one process."""
from typing import Dict, List

import numpy as np


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(numerator.shape, dtype=np.float64), where=denominator > 0)


def summarize(matrix: np.ndarray, class_names: List[str]) -> Dict[str, float]:
    """Accuracy, macro F1 and per-class precision/recall (0 where a class is never predicted)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positive = np.diag(matrix)
    precision = _safe_divide(true_positive, matrix.sum(axis=0))
    recall = _safe_divide(true_positive, matrix.sum(axis=1))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    result = {"accuracy": float(true_positive.sum() / matrix.sum()), "macro_f1": float(f1.mean())}
    for index, name in enumerate(class_names):
        result[f"precision/{name}"] = float(precision[index])
        result[f"recall/{name}"] = float(recall[index])
    return result


def confusion_image(matrix: np.ndarray, class_names: List[str], cell: int = 48) -> np.ndarray:
    """The matrix drawn as an RGB image (HWC, uint8) for TensorBoard: row-normalised shading,
    counts written in the cells, class names on the left."""
    from PIL import Image, ImageDraw

    n = len(class_names)
    margin = 90
    image = Image.new("RGB", (margin + n * cell, margin + n * cell), "white")
    draw = ImageDraw.Draw(image)
    rows = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for true in range(n):
        draw.text((4, margin + true * cell + cell // 3), class_names[true][:12], fill="black")
        draw.text((margin + true * cell + 4, margin - 20), class_names[true][:6], fill="black")
        for predicted in range(n):
            shade = int(255 * (1 - matrix[true, predicted] / rows[true, 0]))
            box = [margin + predicted * cell, margin + true * cell, margin + (predicted + 1) * cell - 1,
                   margin + (true + 1) * cell - 1]
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text((box[0] + 6, box[1] + cell // 3), str(int(matrix[true, predicted])),
                      fill="black" if shade > 128 else "white")
    return np.asarray(image)
