"""Deterministic, realistic word streams for tests, demos and the benchmark.

Real sentences (dialogue and narration, English and Hindi) timed like speech: word length sets its
duration, commas and sentence ends add pauses, now and then a long silence, two speakers taking turns
and a faster speaker at times. Same seed, same stream.
"""
from __future__ import annotations

import random

from captionbus.contracts.transcript import Segment, Transcript, Word
from captionbus.core.subtitles.graphemes import display_len

ENGLISH = [
    "So we went down to the river that morning, and nobody said a word.",
    "The water was colder than anyone expected because of the snow in the hills.",
    "Then Maria laughed.",
    "What are you doing here?",
    "I told you already, I came back for the letters that your father left in the attic before the war.",
    "Yes.",
    "No, wait.",
    "If you really want to understand what happened at the station, you have to start with the night train from Lisbon.",
    "Nobody believed him at first, but the photographs were impossible to ignore.",
    "Come on, we're going to miss it!",
    "The committee will meet again on Thursday to discuss the budget, the new building and the schedule for the spring term.",
    "He picked up the phone, listened for a moment and put it down without saying anything.",
    "Do you remember the name of the restaurant where we had dinner with your sister and her husband last summer?",
    "Of course I do.",
    "It was the little place near the harbour with the blue shutters.",
    "Ladies and gentlemen, welcome aboard this evening's service to Edinburgh, calling at York and Newcastle.",
    "Please make sure that your luggage is stored safely in the racks above your seat.",
    "Honestly, I think this is the most extraordinary thing I have ever seen in my entire life.",
    "Absolutely.",
    "The internationalisation of the programme took considerably longer than the engineers had predicted.",
    "She said that she would call when she got home, but she never did.",
    "Where is everyone?",
    "They left about an hour ago, right after the storm started.",
    "In the end, the decision was not about money or about power, it was about trust.",
    "We should go.",
    "Listen to me very carefully, because I am only going to say this once.",
    "The old lighthouse keeper had kept a diary for forty years, writing down every ship that passed.",
    "Okay, okay, I get it.",
    "And that, my friends, is how the story of the village bakery began.",
    "Are you sure this is the right address?",
]

HINDI = [
    "हम सुबह नदी के किनारे गए और किसी ने एक शब्द भी नहीं कहा।",
    "पानी उम्मीद से कहीं ज़्यादा ठंडा था क्योंकि पहाड़ों पर बर्फ़ गिरी थी।",
    "फिर मारिया हँस पड़ी।",
    "तुम यहाँ क्या कर रहे हो?",
    "मैंने तुम्हें पहले ही बताया था, मैं उन चिट्ठियों के लिए वापस आया हूँ जो तुम्हारे पिताजी ने युद्ध से पहले छोड़ी थीं।",
    "हाँ।",
    "नहीं, रुको।",
    "अगर तुम सच में समझना चाहते हो कि स्टेशन पर क्या हुआ, तो तुम्हें लिस्बन से आने वाली रात की ट्रेन से शुरू करना होगा।",
    "पहले किसी ने उस पर विश्वास नहीं किया, लेकिन तस्वीरों को नज़रअंदाज़ करना असंभव था।",
    "चलो, हम इसे चूक जाएँगे!",
    "समिति गुरुवार को बजट, नई इमारत और वसंत सत्र की समय-सारणी पर चर्चा करने के लिए फिर से मिलेगी।",
    "उसने फ़ोन उठाया, एक पल सुना और बिना कुछ कहे रख दिया।",
    "क्या तुम्हें उस रेस्टोरेंट का नाम याद है जहाँ हमने पिछली गर्मियों में तुम्हारी बहन के साथ खाना खाया था?",
    "बिल्कुल याद है।",
    "वह बंदरगाह के पास नीली खिड़कियों वाली छोटी सी जगह थी।",
    "देवियो और सज्जनो, एडिनबर्ग जाने वाली इस शाम की सेवा में आपका स्वागत है।",
    "कृपया सुनिश्चित करें कि आपका सामान आपकी सीट के ऊपर रैक में सुरक्षित रखा गया है।",
    "सच कहूँ तो, मैंने अपनी पूरी ज़िंदगी में इससे ज़्यादा अद्भुत चीज़ कभी नहीं देखी।",
    "बिल्कुल।",
    "कार्यक्रम के अंतर्राष्ट्रीयकरण में इंजीनियरों के अनुमान से काफ़ी अधिक समय लगा।",
    "उसने कहा था कि घर पहुँचकर फ़ोन करेगी, लेकिन उसने कभी नहीं किया।",
    "सब लोग कहाँ हैं?",
    "वे लगभग एक घंटे पहले चले गए, तूफ़ान शुरू होते ही।",
    "आख़िर में फ़ैसला पैसे या ताक़त के बारे में नहीं था, यह भरोसे के बारे में था।",
    "हमें चलना चाहिए।",
    "मेरी बात ध्यान से सुनो, क्योंकि मैं यह सिर्फ़ एक बार कहूँगा।",
    "पुराने प्रकाशस्तंभ के रखवाले ने चालीस साल तक डायरी लिखी और हर गुज़रने वाले जहाज़ का नाम दर्ज किया।",
    "ठीक है, ठीक है, मैं समझ गया।",
    "और दोस्तो, इस तरह गाँव की बेकरी की कहानी शुरू हुई।",
    "क्या तुम्हें यक़ीन है कि यह सही पता है?",
]

CORPORA = {"en": ENGLISH, "hi": HINDI}


def synthetic_transcript(language: str = "en", sentences: int = 30, seed: int = 0,
                         speakers: bool = True) -> Transcript:
    """A transcript of `sentences` sentences from the corpus, timed like speech."""
    rng = random.Random(f"{language}:{seed}")
    corpus = CORPORA[language]
    t, speaker, rate = 0.5, "A", 1.0
    segments: list[Segment] = []
    for n in range(sentences):
        sentence = corpus[(seed + n) % len(corpus)]
        if rng.random() < 0.3:  # turn-taking, and some speakers talk fast
            speaker = "B" if speaker == "A" else "A"
            rate = rng.choice((0.75, 1.0, 1.0, 1.15))
        words: list[Word] = []
        for text in sentence.split():
            dur = rate * (0.08 + 0.055 * display_len(text)) * rng.uniform(0.85, 1.2)
            words.append(Word(text=text, start=round(t, 3), end=round(t + dur, 3),
                              score=round(rng.uniform(0.6, 1.0), 3)))
            t += dur + rate * rng.uniform(0.02, 0.12)
            if text[-1] in ",;:":
                t += rng.uniform(0.1, 0.4)
        t += rng.choice((0.2, 0.4, 0.6, 0.9, 1.3)) + (rng.uniform(2.5, 4.0) if rng.random() < 0.1 else 0)
        segments.append(Segment(start=words[0].start, end=words[-1].end, text=sentence, words=words,
                                speaker=speaker if speakers else None))
    return Transcript(language=language, duration=round(t, 3), segments=segments)
