"""The demo corpus: a seeded generator of small English documents with ground-truth concept labels.

Each document has a weather theme (hot, cold or rainy) that every sentence of it follows, and maybe a
mood theme (happy, sad, angry); sentences also name animals, colours and food. Themes are told by many
cues, not only by a place: "The weather in Alaska is always cold." and "In winter the wind is icy." and
"The dog plays in the snow." are all cold, so a language model trained on it needs (and an SAE on it
can find) one "cold" direction rather than one per place.

`Document.spans` are the labels: `(start_char, end_char, concept)`, a theme from its first cue to the
end of the document, an animal / colour / food from its word to the end of its sentence. Concepts are
named `weather:cold`, `mood:sad`, `animal:dog`, `colour:red`, `food:bread`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WEATHER_WORDS = {
    "hot": ("hot", "sunny", "warm", "dry", "scorching", "baking"),
    "cold": ("cold", "freezing", "icy", "snowy", "chilly", "frosty"),
    "rainy": ("rainy", "wet", "cloudy", "stormy", "grey", "damp"),
}
WEATHER_NOUNS = {
    "hot": ("sun", "heat", "sand", "summer", "beach", "shade"),
    "cold": ("snow", "ice", "frost", "winter", "sleet", "blizzard"),
    "rainy": ("rain", "clouds", "puddles", "storm", "mud", "drizzle"),
}
PLACES = {
    "hot": (
        "California",
        "Arizona",
        "Texas",
        "Florida",
        "Nevada",
        "Hawaii",
        "Egypt",
        "Morocco",
        "Mexico",
        "Spain",
        "Greece",
        "India",
        "Brazil",
        "Kenya",
        "Dubai",
        "Cairo",
        "Phoenix",
        "Miami",
        "Bali",
        "Jamaica",
        "Cuba",
        "Thailand",
        "Nigeria",
        "Sudan",
        "Oman",
        "Qatar",
        "Libya",
        "Tunisia",
        "Malta",
        "Sicily",
        "Darwin",
        "Manila",
        "Jakarta",
        "Singapore",
        "Bangkok",
        "Delhi",
        "Mumbai",
        "Lagos",
        "Havana",
        "Cancun",
        "Tucson",
        "Houston",
        "Dallas",
        "Honolulu",
        "Barbados",
        "Tahiti",
        "Fiji",
        "Samoa",
        "Senegal",
        "Mali",
        "Chad",
        "Niger",
        "Kuwait",
        "Jordan",
        "Ghana",
        "Panama",
        "Belize",
        "Aruba",
        "Goa",
        "Marrakesh",
    ),
    "cold": (
        "Alaska",
        "Siberia",
        "Greenland",
        "Iceland",
        "Antarctica",
        "Norway",
        "Finland",
        "Sweden",
        "Canada",
        "Yukon",
        "Lapland",
        "Svalbard",
        "Moscow",
        "Oslo",
        "Helsinki",
        "Reykjavik",
        "Anchorage",
        "Montana",
        "Minnesota",
        "Wyoming",
        "Maine",
        "Vermont",
        "Mongolia",
        "Tibet",
        "Nepal",
        "Everest",
        "Quebec",
        "Manitoba",
        "Alberta",
        "Nunavut",
        "Winnipeg",
        "Fairbanks",
        "Juneau",
        "Murmansk",
        "Yakutsk",
        "Kamchatka",
        "Labrador",
        "Tromso",
        "Lhasa",
        "Denali",
        "Patagonia",
        "Ushuaia",
        "Calgary",
        "Edmonton",
        "Estonia",
        "Latvia",
        "Hokkaido",
        "Sapporo",
        "Baffin",
        "Norilsk",
        "Irkutsk",
        "Omsk",
        "Kiruna",
        "Nuuk",
        "Dakota",
        "Chukotka",
        "Ontario",
        "Bergen",
        "Zermatt",
        "Aspen",
    ),
    "rainy": (
        "Seattle",
        "London",
        "Scotland",
        "Ireland",
        "Wales",
        "Oregon",
        "Portland",
        "Vancouver",
        "Dublin",
        "Glasgow",
        "Manchester",
        "Belfast",
        "Cardiff",
        "Amsterdam",
        "Brussels",
        "Holland",
        "Belgium",
        "Tacoma",
        "Bangladesh",
        "Borneo",
        "Sumatra",
        "Congo",
        "Burma",
        "Kerala",
        "Ketchikan",
        "Bristol",
        "Liverpool",
        "Cornwall",
        "Devon",
        "Brittany",
        "Normandy",
        "Galway",
        "Cork",
        "Hamburg",
        "Bremen",
        "Olympia",
        "Aberdeen",
        "Leeds",
        "Sheffield",
        "Limerick",
    ),
}
SEASONS = {"hot": ("summer",), "cold": ("winter",), "rainy": ("autumn", "spring")}
CLOTHES = {
    "hot": ("sun hat", "pair of sandals", "thin shirt", "pair of shorts"),
    "cold": ("warm coat", "thick scarf", "wool hat", "pair of gloves"),
    "rainy": ("raincoat", "pair of boots", "rain hat", "long coat"),
}
WHERE = {  # where things happen in each weather
    "hot": ("in the shade", "on the hot sand", "under the bright sun", "by the sea"),
    "cold": ("by the fire", "in the deep snow", "on the frozen lake", "under a thick blanket"),
    "rainy": ("under the roof", "in the puddles", "under an umbrella", "in the wet grass"),
}
MOOD_WORDS = {
    "happy": ("happy", "glad", "cheerful", "joyful"),
    "sad": ("sad", "gloomy", "unhappy", "lonely"),
    "angry": ("angry", "cross", "furious", "grumpy"),
}
MOOD_VERBS = {
    "happy": ("smiled", "laughed", "sang a song", "danced"),
    "sad": ("cried", "sighed", "wept", "stared at the floor"),
    "angry": ("shouted", "stomped", "frowned", "slammed the door"),
}
ANIMALS = ("cat", "dog", "bird", "horse", "fox", "bear", "rabbit", "duck", "cow", "goat", "owl", "mouse")
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "pink")
FOODS = ("bread", "soup", "rice", "cheese", "apples", "cake", "eggs", "pasta", "beans", "pie")
NAMES = ("Tom", "Anna", "Sam", "Lucy", "Ben", "Mia", "Max", "Emma", "Leo", "Zoe", "Jack", "Ruby")
ADVERBS = ("always", "often", "usually", "very", "mostly")

PLACE_CLIMATE = {place: climate for climate, places in PLACES.items() for place in places}


def weather_vocabulary(climate: str) -> frozenset[str]:
    """The words that say a climate (adjectives and nouns), for checking what a model wrote."""
    return frozenset(WEATHER_WORDS[climate] + WEATHER_NOUNS[climate])


@dataclass
class Document:
    text: str = ""
    spans: list[tuple[int, int, str]] = field(default_factory=list)  # (start_char, end_char, concept)


class _Writer:
    """Builds one document sentence by sentence, recording concept spans as it goes."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.open_themes: dict[str, int] = {}  # concept -> start char (until the document's end)
        self.sentence: list[tuple[int, str]] = []  # (start char, concept) until the sentence's end
        self.spans: list[tuple[int, int, str]] = []

    def add(self, text: str, theme: str | None = None, local: str | None = None) -> None:
        """Append `text`; it is the first cue of `theme`, or names `local` (a sentence-level concept)."""
        if self.parts:
            text = text if text[0] in ".," else " " + text
        offset = self.length + (len(text) - len(text.lstrip()))
        if theme is not None and theme not in self.open_themes:
            self.open_themes[theme] = offset
        if local is not None:
            self.sentence.append((offset, local))
        self.parts.append(text)
        self.length += len(text)
        if text == ".":  # the sentence ends: close its local spans
            self.spans += [(start, self.length, concept) for start, concept in self.sentence]
            self.sentence = []

    def document(self) -> Document:
        spans = self.spans + [(start, self.length, c) for c, start in self.open_themes.items()]
        return Document("".join(self.parts), sorted(spans))


class CorpusGenerator:
    """Documents from `random.Random(seed)`: the same seed gives the same documents."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, options):
        return self.rng.choice(options)

    def document(self) -> Document:
        r = self.rng
        climate = self.pick(tuple(WEATHER_WORDS))
        mood = self.pick(tuple(MOOD_WORDS)) if r.random() < 0.5 else None
        w = _Writer()
        self._opener(w, climate)
        body = [self._animal, self._clothes, self._food, self._wind, self._sky, self._place_line]
        for _ in range(r.randint(2, 4)):
            if mood is not None and r.random() < 0.4:
                self._mood(w, mood, climate)
            else:
                self.pick(body)(w, climate)
        return w.document()

    # ---- sentences (each ends with ".") ----------------------------------------------------------

    def _adj(self, climate: str) -> str:
        return self.pick(WEATHER_WORDS[climate])

    def _weather_phrase(self, w: _Writer, climate: str) -> None:
        """`always sunny` | `cold and icy`: the words that say the weather."""
        cue = f"weather:{climate}"
        if self.rng.random() < 0.7:
            w.add(self.pick(ADVERBS))
        first = self._adj(climate)
        w.add(first, theme=cue)
        if self.rng.random() < 0.35:
            w.add("and")
            w.add(self.pick([a for a in WEATHER_WORDS[climate] if a != first]))

    def _opener(self, w: _Writer, climate: str) -> None:
        cue = f"weather:{climate}"
        place = self.pick(PLACES[climate])
        kind = self.rng.random()
        if kind < 0.45:
            w.add("The weather in")
            w.add(place, theme=cue)
            w.add("is")
            self._weather_phrase(w, climate)
        elif kind < 0.6:
            w.add("In")
            w.add(place, theme=cue)
            w.add("the weather is")
            self._weather_phrase(w, climate)
        elif kind < 0.75:
            w.add("In")
            w.add(self.pick(SEASONS[climate]), theme=cue)
            w.add("the days are")
            self._weather_phrase(w, climate)
        elif kind < 0.88:
            w.add(f"{self.pick(NAMES)} lives in")
            w.add(place, theme=cue)
            w.add(", where it is")
            self._weather_phrase(w, climate)
        else:
            w.add("It was a")
            w.add(self._adj(climate), theme=cue)
            w.add("day")
        w.add(".")

    def _animal(self, w: _Writer, climate: str) -> None:
        animal = self.pick(ANIMALS)
        w.add("The")
        w.add(animal, local=f"animal:{animal}")
        if self.rng.random() < 0.5:
            w.add(f"sleeps {self.pick(WHERE[climate])}", theme=f"weather:{climate}")
        else:
            w.add("likes the")
            w.add(self._adj(climate), theme=f"weather:{climate}")
            w.add("weather")
        w.add(".")

    def _clothes(self, w: _Writer, climate: str) -> None:
        colour = self.pick(COLOURS)
        w.add(f"{self.pick(NAMES)} wore a")
        w.add(colour, local=f"colour:{colour}")
        w.add(self.pick(CLOTHES[climate]), theme=f"weather:{climate}")
        w.add(".")

    def _food(self, w: _Writer, climate: str) -> None:
        food = self.pick(FOODS)
        w.add("We ate")
        w.add(food, local=f"food:{food}")
        w.add(self.pick(WHERE[climate]), theme=f"weather:{climate}")
        w.add(".")

    def _wind(self, w: _Writer, climate: str) -> None:
        noun = self.pick(WEATHER_NOUNS[climate])
        if self.rng.random() < 0.5:
            w.add("The")
            w.add(noun, theme=f"weather:{climate}")
            w.add("came again")
        else:
            w.add("It was")
            w.add(self._adj(climate), theme=f"weather:{climate}")
            w.add(f"all {self.pick(('day', 'week', 'night', 'morning'))}")
        w.add(".")

    def _sky(self, w: _Writer, climate: str) -> None:
        colour = self.pick(COLOURS)
        w.add("The")
        w.add(colour, local=f"colour:{colour}")
        w.add("house looked")
        w.add(self._adj(climate), theme=f"weather:{climate}")
        w.add(".")

    def _place_line(self, w: _Writer, climate: str) -> None:
        w.add("It is")
        w.add(self._adj(climate), theme=f"weather:{climate}")
        w.add("in")
        w.add(self.pick(PLACES[climate]))
        w.add(".")

    def _mood(self, w: _Writer, mood: str, climate: str) -> None:
        cue = f"mood:{mood}"
        name = self.pick(NAMES)
        if self.rng.random() < 0.5:
            w.add(f"{name} felt")
            w.add(self.pick(MOOD_WORDS[mood]), theme=cue)
        else:
            w.add(name)
            w.add(self.pick(MOOD_VERBS[mood]), theme=cue)
            w.add(self.pick(WHERE[climate]))
        w.add(".")

    def documents(self, n: int) -> list[Document]:
        return [self.document() for _ in range(n)]


def weather_prompts(climate: str, template: str = "The weather in {place} is") -> list[tuple[str, str]]:
    """(prompt, place) for every place of a climate."""
    return [(template.format(place=place), place) for place in PLACES[climate]]
