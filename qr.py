"""QR codes of subscription links, as PNG bytes: the one encoder of the bot's photo and the subscription page."""
import io

import zxingcpp
from PIL import Image


def qr_png(link, scale=8):
    """Render a link as a black-and-white PNG QR code: error correction M, 4-module quiet zone, scale px a module.

    zxing-cpp encodes (C++, ~0.4 ms), Pillow writes the PNG (~1 ms); qrcode + pypng took ~25 ms.
    """
    code = zxingcpp.create_barcode(link, zxingcpp.BarcodeFormat.QRCode, ec_level='M')
    modules = code.to_image(scale=1, add_quiet_zones=True)  # 8-bit grey, one pixel a module
    height, width = modules.shape
    image = Image.frombuffer('L', (width, height), bytes(modules), 'raw', 'L', 0, 1)
    image = image.convert('1', dither=Image.Dither.NONE).resize((width * scale, height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, 'PNG')
    return buffer.getvalue()
