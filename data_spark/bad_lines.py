"""Low-quality lines made by code, for the sentence-quality seed: spam, boilerplate and garbage, in
English and Chinese.

Every line comes from a seeded ``random.Random``, so a seed gives the same lines on every machine and a
different seed gives a held-out set from the same generator. The word lists are short and project-written;
variety comes from combining them (templates, separators, repetition, casing, URLs, numbers) and from
corrupting real lines passed in as ``material`` (mojibake, markup wrapped around them, stuffed keywords).
"""

from __future__ import annotations

import base64
import random
import string
from collections.abc import Callable

KINDS = ("spam", "boilerplate", "garbage")

# ------------------------------------------------------------------------------------------- English

_EN_ACTION = [
    "click here", "buy now", "order now", "act now", "sign up today", "limited time offer", "100% free",
    "free shipping", "best price", "lowest prices", "don't miss out", "visit our website", "call now",
    "get it now", "special promotion", "exclusive deal", "risk free", "money back guarantee", "earn money fast",
    "work from home", "lose weight fast", "hot deal", "claim your prize", "you have won", "apply now",
    "no credit check", "cash bonus", "instant approval", "double your income", "free trial", "save up to 90%",
    "only today", "offer expires soon", "while stocks last", "guaranteed results", "unbelievable discount",
]
_EN_PRODUCT = [
    "watches", "pills", "replica bags", "payday loans", "casino bonus", "crypto coins", "followers", "likes",
    "seo services", "essay writing", "diet pills", "cheap flights", "designer shoes", "phone cases", "backlinks",
    "forex signals", "slot machines", "sunglasses", "gift cards", "vpn deals", "dating site", "weight loss tea",
]
_EN_HYPE = ["best", "cheap", "cheapest", "free", "top", "amazing", "hot", "new", "discount", "official", "real",
            "genuine", "premium", "online", "wholesale", "original", "certified", "exclusive", "legit", "fast"]
_EN_DECOR = ["!!!", "!!", "$$$", "***", ">>>", "<<<", "!!!!!", "???", "$$", "+++", "==>", "->", "~~~", "!!1"]
_TLDS = ["com", "net", "biz", "info", "xyz", "top", "club", "online", "ru", "cn"]

_EN_NAV = [
    "Home", "About", "About Us", "Contact", "Contact Us", "Blog", "News", "Products", "Services", "Shop", "Cart",
    "Login", "Log in", "Sign in", "Sign up", "Register", "FAQ", "Help", "Support", "Careers", "Sitemap",
    "Privacy Policy", "Terms of Use", "Terms and Conditions", "Search", "Menu", "Skip to content", "Next",
    "Previous", "Back to top", "Read more", "More", "Archives", "Categories", "Tags", "Subscribe", "Donate",
    "Events", "Gallery", "Downloads", "Forum", "Store", "My Account", "Checkout", "Wishlist", "Press",
]
_EN_SEP = [" | ", " › ", " > ", " · ", " / ", " - ", "  ", " • ", " :: ", " » "]
_COMPANIES = ["Example Media", "Acme Corp", "Globex", "Initech", "Bluebird Press", "Northwind", "Contoso",
              "Umbrella Group", "Stark Digital", "Wayne Publishing", "Sunrise Web", "Pixel Labs"]
_EN_BOILER: list[Callable[[random.Random], str]] = [
    lambda r: f"Copyright © {r.randint(1998, 2025)} {r.choice(_COMPANIES)}. All rights reserved.",
    lambda r: f"© {r.randint(1998, 2025)}-{r.randint(2015, 2025)} {r.choice(_COMPANIES)} Inc. All Rights Reserved.",
    lambda r: f"Powered by {r.choice(['WordPress', 'Joomla', 'Drupal', 'Shopify'])} | Theme by {r.choice(_COMPANIES)}",
    lambda r: "We use cookies to " + r.choice(["improve your experience", "personalise content and ads",
              "analyse our traffic", "give you the best experience on our website"]) + ". " + r.choice([
              "By continuing to browse, you agree to our use of cookies.", "Accept all cookies?",
              "Learn more in our cookie policy.", "Click OK to continue."]),
    lambda r: r.choice(["This website uses cookies.", "This site uses cookies from Google to deliver its services."])
              + " " + r.choice(["Accept", "Accept all", "Manage preferences", "OK, got it", "Learn more"]),
    lambda r: "Share on " + r.choice(["Twitter", "Facebook", "LinkedIn", "Pinterest", "Reddit", "WhatsApp"])
              + r.choice(["", " | Share on Facebook", " | Email | Print", " | Tweet | Pin it"]),
    lambda r: "Share this: " + " ".join(r.sample(["Twitter", "Facebook", "LinkedIn", "Email", "Print", "Reddit",
                                                  "Tumblr", "Pocket", "Telegram"], r.randint(3, 6))),
    lambda r: "Follow us on " + ", ".join(r.sample(["Facebook", "Twitter", "Instagram", "YouTube", "TikTok"], 3)),
    lambda r: f"Posted by {r.choice(['admin', 'editor', 'webmaster', 'guest'])} on "
              f"{r.choice(['January', 'March', 'July', 'October'])} {r.randint(1, 28)}, {r.randint(2005, 2025)} | "
              f"{r.randint(0, 99)} comments",
    lambda r: "Your email address will not be published. Required fields are marked *",
    lambda r: "Leave a reply" + r.choice(["", " Cancel reply", ". You must be logged in to post a comment."]),
    lambda r: "Tags: " + ", ".join(r.sample(_EN_PRODUCT + _EN_HYPE, r.randint(3, 7))),
    lambda r: f"Filed under: {r.choice(_EN_NAV)}, {r.choice(_EN_NAV)} | Related posts",
    lambda r: r.choice(["You might also like", "Related articles", "Recommended for you", "Trending now",
                        "Most popular", "Sponsored links", "Advertisement"]) + r.choice([":", "", " »", " ..."]),
    lambda r: f"Page {r.randint(1, 9)} of {r.randint(10, 99)} « First ‹ Prev 1 2 3 ... Next › Last »",
    lambda r: r.choice(["Subscribe to our newsletter", "Sign up for our newsletter", "Join our mailing list"])
              + r.choice(["!", " and get 10% off your first order!", ". Enter your email address:", ""]),
    lambda r: r.choice(["Please enable JavaScript to view the comments.", "JavaScript is disabled in your browser.",
                        "Loading...", "Your browser does not support the video tag.", "Click to enlarge",
                        "Report abuse", "Log in to reply", "Print this page", "Back to top ↑"]),
    lambda r: f"{r.randint(2, 999)} views · {r.randint(1, 59)} {r.choice(['minutes', 'hours', 'days'])} ago · "
              f"{r.randint(1, 20)} min read",
]

_LETTERS = string.ascii_letters
_SYMBOLS = "!@#$%^&*()_+-=[]{};:'\",.<>/?\\|`~"
_MARKUP = [
    '<div class="{w}">', "</div>", '<span style="color:#{h}">', "</span>", "<br/>", "<br>", "&nbsp;", "&amp;",
    "&lt;", "&gt;", "</td><td>", "<tr>", "</tr>", '<a href="http://{w}.{t}/{n}">', "</a>", "{{{{ {w} }}}}",
    "[url=http://{w}.{t}]", "[/url]", "<!-- {w} -->", '<img src="/{w}/{n}.jpg">', "<p>", "</p>", "<li>",
    "var {w}={n};", "function(){{return {n}}}", "margin:0 auto;", "padding:{n}px;", "}};", "%{h}%{h}",
]


def _url(r: random.Random, word: str) -> str:
    return r.choice(["http://", "https://", "www.", "http://www."]) + f"{word.replace(' ', '-')}{r.randint(1, 999)}." \
        + r.choice(_TLDS) + r.choice(["", "/", f"/?id={r.randint(1, 99999)}", f"/{r.choice(_EN_HYPE)}-deal"])


def _shout(r: random.Random, text: str) -> str:
    mode = r.random()
    if mode < 0.3:
        return text.upper()
    if mode < 0.5:
        return " ".join(w.upper() if r.random() < 0.4 else w for w in text.split(" "))
    if mode < 0.6:
        return text.title()
    return text


def en_spam(r: random.Random, material: list[str]) -> str:
    product = r.choice(_EN_PRODUCT)
    kind = r.randrange(6)
    if kind == 0:  # call to action
        parts = [r.choice(_EN_ACTION) for _ in range(r.randint(2, 5))]
        parts.insert(r.randint(0, len(parts)), f"{r.choice(_EN_HYPE)} {product}")
        text = " ".join(p + r.choice(["", "", r.choice(_EN_DECOR)]) for p in parts)
    elif kind == 1:  # keyword stuffing around a product
        words = [r.choice([product, product, r.choice(_EN_HYPE), f"{r.choice(_EN_HYPE)} {product}"])
                 for _ in range(r.randint(5, 12))]
        text = " ".join(words)
    elif kind == 2:  # repeated tokens
        token = r.choice([*_EN_HYPE, "win", "bonus", "free", "sale", "money", "casino", "deal", product.split()[0]])
        text = " ".join([token] * r.randint(3, 8)) + " " + r.choice(_EN_ACTION)
    elif kind == 3:  # keyword stuffing with a real word
        source = r.choice(material).split() if material else ["python"]
        word = r.choice([w for w in source if w.isalpha() and len(w) > 3] or ["python"]).lower()
        text = " ".join(r.choice([word, word, f"{r.choice(_EN_HYPE)} {word}", f"{word} {r.choice(_EN_PRODUCT)}",
                                  r.choice(_EN_ACTION)]) for _ in range(r.randint(4, 9)))
    elif kind == 4:  # prize / scam notice
        text = r.choice(["Congratulations", "CONGRATULATIONS", "Dear winner", "Attention"]) + "! " + r.choice([
            f"You have been selected to receive a free {product}", f"You won a ${r.randint(100, 9999)} gift card",
            f"Make ${r.randint(100, 999)} a day from home", f"Get {r.randint(10, 90)}% off all {product}"]) \
            + r.choice(_EN_DECOR) + " " + r.choice(_EN_ACTION)
    else:  # price list
        text = f"{r.choice(_EN_HYPE)} {product} only ${r.randint(1, 99)}.{r.randint(0, 99):02d} " \
            + r.choice(_EN_DECOR) + " " + r.choice(_EN_ACTION) + " " + r.choice(_EN_ACTION)
    if r.random() < 0.5:
        text += " " + _url(r, product)
    if r.random() < 0.3:
        text = f"{r.choice(_EN_DECOR)} {text}"
    return _shout(r, text)


def en_boilerplate(r: random.Random, material: list[str]) -> str:
    if r.random() < 0.35:
        items = r.sample(_EN_NAV, r.randint(3, 9))
        return r.choice(_EN_SEP).join(items)
    text = r.choice(_EN_BOILER)(r)
    if r.random() < 0.25:
        text = r.choice(_EN_SEP).join(r.sample(_EN_NAV, r.randint(2, 4))) + r.choice(_EN_SEP) + text
    return text


def _mojibake(text: str, r: random.Random) -> str:
    """UTF-8 bytes read as cp1252/latin-1 (English) or as GBK (Chinese): the classic broken page."""
    if all(c.isascii() for c in text):
        words = text.split(" ")
        for i in r.sample(range(len(words)), max(1, len(words) // 4)):
            words[i] = words[i] + r.choice(["’s", "“", "”", "é", "—", "…", "ü", "ñ", "–"])
        text = " ".join(words)
    codec = "gbk" if any("\u4e00" <= c <= "\u9fff" for c in text) else r.choice(["cp1252", "latin-1"])
    return text.encode("utf-8").decode(codec, errors="replace")


def en_garbage(r: random.Random, material: list[str]) -> str:
    kind = r.randrange(8)
    if kind == 0:  # random characters with a few spaces
        chars = _LETTERS + string.digits + _SYMBOLS
        return "".join(r.choice(chars) if r.random() > 0.12 else " " for _ in range(r.randint(15, 120))).strip() or "x#1"
    if kind == 1:  # consonant mash words
        return " ".join("".join(r.choice("bcdfghjklmnpqrstvwxz" + "aeiou" * (r.random() < 0.3))
                                for _ in range(r.randint(2, 14))) for _ in range(r.randint(3, 12)))
    if kind == 2:  # base64 run
        blob = base64.b64encode(r.randbytes(r.randint(24, 150))).decode()
        return r.choice(["", "data:image/png;base64,", "src=", "token: ", "-----BEGIN KEY----- "]) + blob
    if kind == 3:  # hex dump or hashes
        if r.random() < 0.5:
            return " ".join(f"{r.randrange(256):02x}" for _ in range(r.randint(8, 32)))
        return " ".join(r.randbytes(r.randint(8, 32)).hex() for _ in range(r.randint(1, 4)))
    if kind == 4 and material:  # mojibake of a real line
        return _mojibake(r.choice(material), r)
    if kind == 5:  # broken markup, maybe around a fragment of real text
        pieces = [r.choice(_MARKUP).format(w=r.choice(_EN_HYPE), t=r.choice(_TLDS), n=r.randint(0, 999),
                                           h=f"{r.randrange(4096):03x}") for _ in range(r.randint(3, 9))]
        if material and r.random() < 0.4:
            words = r.choice(material).split()
            pieces.insert(r.randint(0, len(pieces)), " ".join(words[: r.randint(1, 4)]))
        return "".join(pieces)
    if kind == 6:  # a table of numbers
        sep = r.choice([" ", "  ", "\t", " | ", ",", ";"])
        return sep.join(r.choice([str(r.randint(0, 9999)), f"{r.uniform(-100, 100):.{r.randint(1, 4)}f}",
                                  f"{r.randint(1, 99)}%", f"{r.randint(0, 999):,}"]) for _ in range(r.randint(5, 16)))
    # symbol rows and letter runs
    return r.choice([
        (r.choice("=-*#~_+.") * r.randint(2, 4)) * r.randint(5, 20),
        " ".join(r.choice(["lol", "haha", "xD", "omg", "aaaa", "zzz", "hmm", "!!!", "???"]) for _ in range(r.randint(4, 10))),
        "".join(r.choice(_LETTERS) * r.randint(3, 9) for _ in range(r.randint(2, 6))),
    ])


# ------------------------------------------------------------------------------------------- Chinese

_ZH_ACTION = ["加微信", "加QQ", "点击链接", "免费领取", "限时优惠", "立即注册", "马上抢购", "扫码关注", "私聊", "火爆招商",
              "低价出售", "欢迎咨询", "包邮到家", "一手货源", "秒杀", "爆款直降", "点击进入", "立即下载", "抢红包", "领取福利"]
_ZH_PRODUCT = ["代办证件", "发票", "彩票", "网贷", "刷单兼职", "减肥药", "高仿包包", "游戏外挂", "粉丝", "学历", "手机号",
               "信用卡套现", "博彩", "理财产品", "私服", "代写论文", "美容针", "保健品", "二手车", "壮阳药"]
_ZH_HYPE = ["日赚千元", "月入过万", "稳赚不赔", "百分百", "全网最低", "超低价", "正品保证", "无需押金", "当天到账", "轻松赚钱"]
_ZH_NAV = ["首页", "新闻", "体育", "娱乐", "财经", "科技", "汽车", "房产", "教育", "旅游", "游戏", "视频", "图片", "论坛",
           "博客", "关于我们", "联系我们", "网站地图", "帮助中心", "登录", "注册", "返回顶部", "更多", "下一页", "上一页"]
_ZH_BOILER: list[Callable[[random.Random], str]] = [
    lambda r: f"版权所有 © {r.randint(2000, 2025)} {r.choice(['示例网', '某某信息网', '新闻中心', '门户网站'])} 保留所有权利",
    lambda r: f"{r.choice(['京', '沪', '粤', '浙'])}ICP备{r.randint(10000000, 99999999)}号-{r.randint(1, 9)}",
    lambda r: "分享到：" + " ".join(r.sample(["微博", "微信", "QQ空间", "豆瓣", "朋友圈", "QQ好友"], r.randint(2, 5))),
    lambda r: f"上一篇：{r.choice(_ZH_NAV)}  下一篇：{r.choice(_ZH_NAV)}",
    lambda r: f"责任编辑：{r.choice(['张', '王', '李', '赵', '刘'])}{r.choice(['明', '伟', '芳', '静', '强'])}"
              f" 来源：{r.choice(['网络', '本站', '综合'])}",
    lambda r: r.choice(["免责声明：本站部分内容来源于网络，如有侵权请联系删除。", "本文来源于网络，仅供参考。",
                        "转载请注明出处。", "扫一扫关注我们的微信公众号", "点击查看更多", "发表评论", "阅读全文",
                        "已有0人评论", "热门推荐", "相关阅读", "猜你喜欢", "广告", "加载中……"]),
    lambda r: f"阅读({r.randint(0, 99999)}) 评论({r.randint(0, 999)}) 点赞({r.randint(0, 999)})",
    lambda r: f"发布时间：{r.randint(2005, 2025)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} "
              f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d} 浏览次数：{r.randint(1, 9999)}",
]


def zh_spam(r: random.Random, material: list[str]) -> str:
    kind = r.randrange(4)
    product = r.choice(_ZH_PRODUCT)
    if kind == 0:
        parts = [r.choice(_ZH_ACTION) for _ in range(r.randint(2, 4))] + [product, r.choice(_ZH_HYPE)]
        r.shuffle(parts)
        text = r.choice(["", "，", " "]).join(p + r.choice(["", "！！！", "！", "~~"]) for p in parts)
    elif kind == 1:
        token = r.choice(["赚钱", "免费", "优惠", "注册", product[:2], "红包"])
        text = token * r.randint(3, 6) + " " + r.choice(_ZH_ACTION)
    elif kind == 2:
        text = f"{r.choice(_ZH_ACTION)}{r.randint(10000, 9999999999)}，{product}{r.choice(_ZH_HYPE)}！！！"
    else:
        text = f"【{r.choice(_ZH_HYPE)}】{product}{r.choice(_ZH_ACTION)}，{r.choice(_ZH_ACTION)}" \
            f"，电话：1{r.randint(3000000000, 9999999999)}"
    if r.random() < 0.4:
        text += " " + _url(r, r.choice(["vip", "zhuan", "daili", "shop", "bet"]))
    return text


def zh_boilerplate(r: random.Random, material: list[str]) -> str:
    if r.random() < 0.35:
        return r.choice([" | ", " ", "  ", " · ", "｜"]).join(r.sample(_ZH_NAV, r.randint(4, 10)))
    return r.choice(_ZH_BOILER)(r)


def zh_garbage(r: random.Random, material: list[str]) -> str:
    kind = r.randrange(5)
    if kind == 0:  # random CJK characters
        return "".join(chr(r.randint(0x4E00, 0x9FA5)) for _ in range(r.randint(8, 40)))
    if kind == 1 and material:  # UTF-8 read as GBK
        return _mojibake(r.choice(material), r)
    if kind == 2:  # the replacement-character run of a broken GBK page
        return "".join(r.choice(["锟斤拷", "烫烫烫", "屯屯屯", "\ufffd\ufffd", "锘"]) for _ in range(r.randint(3, 10)))
    if kind == 3:  # full-width punctuation and symbols
        return "".join(r.choice("，。！？；：“”（）【】《》…—·￥％＃＠＆＊") for _ in range(r.randint(10, 40)))
    # CJK characters mixed with digits and Latin noise
    return "".join(r.choice([chr(r.randint(0x4E00, 0x9FA5)), r.choice(string.digits), r.choice(_LETTERS),
                             r.choice(_SYMBOLS)]) for _ in range(r.randint(10, 50)))


GENERATORS: dict[str, dict[str, Callable[[random.Random, list[str]], str]]] = {
    "en": {"spam": en_spam, "boilerplate": en_boilerplate, "garbage": en_garbage},
    "zh": {"spam": zh_spam, "boilerplate": zh_boilerplate, "garbage": zh_garbage},
}


def generate(seed: int, counts: dict[str, int], material: dict[str, list[str]]) -> dict[str, list[str]]:
    """``counts`` (``"en:spam"`` -> n) distinct lines per language and kind; ``material`` (language -> real
    lines) feeds the generators that corrupt real text. Lines shorter than 12 characters are redrawn."""
    out: dict[str, list[str]] = {}
    for key in sorted(counts):
        language, kind = key.split(":")
        r = random.Random(f"{seed}:{key}")
        make, seen, lines = GENERATORS[language][kind], set(), []
        attempts = 0
        while len(lines) < counts[key] and attempts < 20 * counts[key] + 100:
            attempts += 1
            line = " ".join(make(r, material.get(language, [])).split())
            if len(line) >= 12 and line not in seen:
                seen.add(line)
                lines.append(line)
        out[key] = lines
    return out
