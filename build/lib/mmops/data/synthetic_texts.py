"""The words of the synthetic dataset families: instructions, topics, captions and questions."""

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ADD_TEMPLATES = (
    "add {k}",
    "Add {k} to it.",
    "shift it by {k}",
    "what is it plus {k}?",
    "Move {k} steps forward from the symbol.",
    "increase the number shown by {k}",
    "Take the figure and count on {k} more.",
    "the answer is the symbol plus {k}",
)
DIGIT_TEMPLATES = (
    "add {k} to the digit",
    "shift the number up by {k}",
    "what is this digit plus {k}?",
)
TOPICS = {
    "sport": ("match", "goal", "referee", "stadium", "team", "league", "striker", "tournament"),
    "weather": ("rain", "storm", "forecast", "sunshine", "wind", "cloud", "temperature", "frost"),
    "cooking": ("recipe", "oven", "flour", "simmer", "sauce", "kitchen", "bake", "spices"),
    "music": ("guitar", "concert", "melody", "chorus", "drummer", "album", "violin", "lyrics"),
    "finance": ("shares", "interest", "budget", "loan", "market", "dividend", "invoice", "bank"),
    "travel": ("flight", "passport", "hotel", "luggage", "itinerary", "beach", "train", "visa"),
}
TOPIC_TEMPLATES = (
    "Yesterday everyone was talking about the {w}.",
    "Can you tell me more about the {w} and the {v}?",
    "a short note on {w}",
    "I read an article mentioning {w} and {v} this morning.",
    "{W} again, as usual.",
    "They asked whether the {w} would change anything.",
    "notes: {w}, {v}, and a few other things",
    "Nobody expected the {w} to matter that much.",
)
# Sentences without a topic word: for these rows only the image can tell the topic.
GENERIC_TEXTS = (
    "Here is another one.",
    "Something happened today.",
    "see the attached picture",
    "what do you make of this?",
    "A short message without much detail.",
)
CAPTIONS = (
    "a picture",
    "an image of something",
    "What is shown here?",
    "photo taken outdoors",
    "Describe this image.",
    "a small object on a plain background",
    "one more sample",
    "look at this",
    "Which one is it?",
    "an item from the collection",
)
BOXES = ("alpha", "beta", "gamma")
BOX_TEMPLATES = (
    "put it in box {b}",
    "This one goes to tray {b}.",
    "file it under {b}",
    "{B} group, please.",
    "sort into bin {b}",
    "destination: {b}",
)
SIDE_TEMPLATES = {
    "colour": (
        "What colour is the {side} shape?",
        "the {side} one: which colour?",
        "colour of the object on the {side}",
    ),
    "shape": (
        "Which shape is on the {side}?",
        "name the {side} shape",
        "what is drawn on the {side} side?",
    ),
}
POINT_TEMPLATES = ("What is on the {side}?", "the {side} shape is", "name the one on the {side}")
TEXTURE_TEMPLATES = {
    "material": (
        "What material is this?",
        "which surface is shown",
        "name the texture",
        "what is this made of?",
    ),
    "grain": (
        "Is the grain coarse or fine?",
        "how fine is the pattern",
        "coarse or fine texture?",
        "describe the grain size",
    ),
}
