"""Fixed texts: one set calibrates int8 smoothing, a disjoint set evaluates quality."""

CALIBRATION = [
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "knowledge spread across Europe. Within fifty years, millions of books had been printed.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "<|im_start|>user\nWhat is the capital of France, and why is it famous?<|im_end|>\n<|im_start|>assistant\n"
    "The capital of France is Paris. It is famous for the Eiffel Tower, the Louvre and its cafés.<|im_end|>\n",
    "Photosynthesis converts light energy into chemical energy: 6 CO2 + 6 H2O -> C6H12O6 + 6 O2. "
    "Chlorophyll absorbs mostly blue and red light.",
]

EVAL = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who told stories "
    "about the storms he had survived. Every evening the children gathered around him to listen.",
    "import numpy as np\n\nclass RunningMean:\n    def __init__(self):\n        self.total = 0.0\n"
    "        self.count = 0\n\n    def update(self, x):\n        self.total += float(x)\n        self.count += 1\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nGive me three tips for staying focused while studying.<|im_end|>\n<|im_start|>assistant\n"
    "1. Remove distractions: put your phone in another room.\n2. Work in short blocks with breaks.\n"
    "3. Set a clear goal for each session.<|im_end|>\n",
    "The mitochondria is often called the powerhouse of the cell because it produces adenosine "
    "triphosphate, the molecule that stores and transfers energy within cells.",
    "To solve 3x + 7 = 22, subtract 7 from both sides to get 3x = 15, then divide by 3: x = 5. "
    "Check: 3 * 5 + 7 = 22.",
    "Le petit prince demanda au renard: qu'est-ce que signifie apprivoiser? C'est une chose trop oubliée, dit le renard.",
    "The quarterly report shows revenue grew by 12 percent, driven by strong sales in Asia, while "
    "operating costs remained flat compared with the previous year.",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin walked on the surface while "
    "Michael Collins orbited above in the command module.",
]
