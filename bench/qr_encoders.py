"""CPU to render one subscription link as a PNG QR code, per encoder, each checked by decoding it back.

    .venv/bin/python bench/qr_encoders.py [--codes 40] [--repeat 5]

Encoders: qrcode + pypng (the bot until 2751ac3), qrcode + Pillow, segno's own PNG writer (`pip install
qrcode pypng segno` to include them; not requirements), zxing-cpp + Pillow (qr.qr_png: the bot and the page).
All at error correction M with a 4-module quiet zone and 8 px a module. CPU is this process's
(time.process_time), the minimum over --repeat rounds, so other work on the machine moves it
little. Each PNG is decoded with zxing-cpp's reader, as taken and as a phone camera would see it
(a third of the size, smoothed).
"""
import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zxingcpp  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

import common  # noqa: E402,F401 - the machine line


def qrcode_pypng(link):
    import qrcode
    from qrcode.image.pure import PyPNGImage
    buffer = io.BytesIO()
    qrcode.make(link, image_factory=PyPNGImage, box_size=8, border=4).save(buffer)
    return buffer.getvalue()


def qrcode_pillow(link):
    import qrcode
    buffer = io.BytesIO()
    qrcode.make(link, box_size=8, border=4).save(buffer)
    return buffer.getvalue()


def segno_png(link):
    import segno
    buffer = io.BytesIO()
    segno.make_qr(link, error='m', boost_error=False).save(buffer, kind='png', scale=8, border=4)
    return buffer.getvalue()


def zxing_pillow(link):
    from qr import qr_png
    return qr_png(link)


def decodes(png, link):
    image = Image.open(io.BytesIO(png))
    found = [(code.text, code.ec_level) for code in zxingcpp.read_barcodes(image)]
    phone = image.convert('L').resize((image.width // 3, image.height // 3), Image.BILINEAR)
    phone = phone.filter(ImageFilter.GaussianBlur(1))
    return found == [(link, 'M')] and [code.text for code in zxingcpp.read_barcodes(phone)] == [link], image.size


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--codes', type=int, default=40)
    parser.add_argument('--repeat', type=int, default=5)
    args = parser.parse_args()
    print(f'# qr encoders: {common.machine_line()}')
    links = [f'https://vpn.example.test:2096/sub/{i:016d}' for i in range(args.codes)]
    for label, encode in (('qrcode + pypng (before)', qrcode_pypng), ('qrcode + Pillow', qrcode_pillow),
                          ('segno', segno_png), ('zxing-cpp + Pillow (qr.qr_png)', zxing_pillow)):
        try:
            png = encode(links[0])
        except ImportError as exc:
            print(f'  {label:34} not installed ({exc.name})')
            continue
        rounds = []
        for _ in range(args.repeat):
            started = time.process_time()
            for link in links:
                encode(link)
            rounds.append((time.process_time() - started) / len(links) * 1000)
        ok, size = decodes(png, links[0])
        print(f'  {label:34} {min(rounds):6.2f} ms CPU a code (min of {args.repeat})  {len(png)} bytes '
              f'{size[0]}x{size[1]}  decodes: {"yes" if ok else "NO"}')


if __name__ == '__main__':
    main()
