/// Incremental UTF-8 validation (RFC 3629, as RFC 6455 §8.1 requires of text messages): fed fragment by
/// fragment, it rejects at the first byte that cannot continue a valid sequence — overlong forms,
/// surrogates and code points past U+10FFFF included — so a bad text message fails fast (1007).
struct UTF8Validator {
    private var needed = 0
    private var lower: UInt8 = 0x80
    private var upper: UInt8 = 0xBF

    /// False at the first invalid byte; the validator is then spent.
    mutating func feed(_ bytes: some Sequence<UInt8>) -> Bool {
        for byte in bytes {
            if needed == 0 {
                switch byte {
                case 0x00...0x7F: continue
                case 0xC2...0xDF: needed = 1
                case 0xE0: needed = 2; lower = 0xA0
                case 0xE1...0xEC, 0xEE...0xEF: needed = 2
                case 0xED: needed = 2; upper = 0x9F
                case 0xF0: needed = 3; lower = 0x90
                case 0xF1...0xF3: needed = 3
                case 0xF4: needed = 3; upper = 0x8F
                default: return false
                }
            } else {
                guard byte >= lower && byte <= upper else { return false }
                lower = 0x80
                upper = 0xBF
                needed -= 1
            }
        }
        return true
    }

    /// No sequence left open (checked when the message ends).
    var isComplete: Bool { needed == 0 }
}
