"""Language codes every process agrees on: ISO 639-1 as users type them, ISO 639-2/B as
container metadata wants them (mp4/mkv), and which ones Whisper can recognise."""
from __future__ import annotations

# ISO 639-1 -> (ISO 639-2/B, English name). Covers Whisper's languages.
LANGUAGES: dict[str, tuple[str, str]] = {
    "af": ("afr", "Afrikaans"), "am": ("amh", "Amharic"), "ar": ("ara", "Arabic"),
    "as": ("asm", "Assamese"), "az": ("aze", "Azerbaijani"), "ba": ("bak", "Bashkir"),
    "be": ("bel", "Belarusian"), "bg": ("bul", "Bulgarian"), "bn": ("ben", "Bengali"),
    "bo": ("tib", "Tibetan"), "br": ("bre", "Breton"), "bs": ("bos", "Bosnian"),
    "ca": ("cat", "Catalan"), "cs": ("cze", "Czech"), "cy": ("wel", "Welsh"),
    "da": ("dan", "Danish"), "de": ("ger", "German"), "el": ("gre", "Greek"),
    "en": ("eng", "English"), "es": ("spa", "Spanish"), "et": ("est", "Estonian"),
    "eu": ("baq", "Basque"), "fa": ("per", "Persian"), "fi": ("fin", "Finnish"),
    "fo": ("fao", "Faroese"), "fr": ("fre", "French"), "gl": ("glg", "Galician"),
    "gu": ("guj", "Gujarati"), "ha": ("hau", "Hausa"), "haw": ("haw", "Hawaiian"),
    "he": ("heb", "Hebrew"), "hi": ("hin", "Hindi"), "hr": ("hrv", "Croatian"),
    "ht": ("hat", "Haitian"), "hu": ("hun", "Hungarian"), "hy": ("arm", "Armenian"),
    "id": ("ind", "Indonesian"), "is": ("ice", "Icelandic"), "it": ("ita", "Italian"),
    "ja": ("jpn", "Japanese"), "jw": ("jav", "Javanese"), "ka": ("geo", "Georgian"),
    "kk": ("kaz", "Kazakh"), "km": ("khm", "Khmer"), "kn": ("kan", "Kannada"),
    "ko": ("kor", "Korean"), "la": ("lat", "Latin"), "lb": ("ltz", "Luxembourgish"),
    "ln": ("lin", "Lingala"), "lo": ("lao", "Lao"), "lt": ("lit", "Lithuanian"),
    "lv": ("lav", "Latvian"), "mg": ("mlg", "Malagasy"), "mi": ("mao", "Maori"),
    "mk": ("mac", "Macedonian"), "ml": ("mal", "Malayalam"), "mn": ("mon", "Mongolian"),
    "mr": ("mar", "Marathi"), "ms": ("may", "Malay"), "mt": ("mlt", "Maltese"),
    "my": ("bur", "Burmese"), "ne": ("nep", "Nepali"), "nl": ("dut", "Dutch"),
    "nn": ("nno", "Norwegian Nynorsk"), "no": ("nor", "Norwegian"), "oc": ("oci", "Occitan"),
    "or": ("ori", "Odia"), "pa": ("pan", "Punjabi"), "pl": ("pol", "Polish"),
    "ps": ("pus", "Pashto"), "pt": ("por", "Portuguese"), "ro": ("rum", "Romanian"),
    "ru": ("rus", "Russian"), "sa": ("san", "Sanskrit"), "sd": ("snd", "Sindhi"),
    "si": ("sin", "Sinhala"), "sk": ("slo", "Slovak"), "sl": ("slv", "Slovenian"),
    "sn": ("sna", "Shona"), "so": ("som", "Somali"), "sq": ("alb", "Albanian"),
    "sr": ("srp", "Serbian"), "su": ("sun", "Sundanese"), "sv": ("swe", "Swedish"),
    "sw": ("swa", "Swahili"), "ta": ("tam", "Tamil"), "te": ("tel", "Telugu"),
    "tg": ("tgk", "Tajik"), "th": ("tha", "Thai"), "tk": ("tuk", "Turkmen"),
    "tl": ("tgl", "Tagalog"), "tr": ("tur", "Turkish"), "tt": ("tat", "Tatar"),
    "uk": ("ukr", "Ukrainian"), "ur": ("urd", "Urdu"), "uz": ("uzb", "Uzbek"),
    "vi": ("vie", "Vietnamese"), "yi": ("yid", "Yiddish"), "yo": ("yor", "Yoruba"),
    "yue": ("chi", "Cantonese"), "zh": ("chi", "Chinese"),
}


class UnknownLanguage(ValueError):
    pass


def check_language(code: str) -> str:
    """The normalised code, or an error a person can act on."""
    normalised = (code or "").strip().lower()
    if normalised not in LANGUAGES:
        raise UnknownLanguage(
            f"unknown language code {code!r}: use an ISO 639-1 code such as en, hi, ta, bn "
            f"({len(LANGUAGES)} are known; see captionbus/contracts/languages.py)"
        )
    return normalised


def iso639_2(code: str) -> str:
    return LANGUAGES[check_language(code)][0]
