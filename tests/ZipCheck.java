import java.io.BufferedInputStream;
import java.io.BufferedOutputStream;
import java.io.FileDescriptor;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.zip.CRC32;
import java.util.zip.ZipEntry;
import java.util.zip.ZipInputStream;

/**
 * Reads a ZIP archive front to back with java.util.zip.ZipInputStream, which
 * sees only the local headers (never the central directory), as a browser or
 * a pipe would.
 *
 * <p>Run with {@code java ZipCheck.java <archive.zip>} (Java 11+ launches a
 * single source file). For every entry it prints one line, in archive order:
 * the CRC-32 of the bytes read (8 hex digits), how many bytes were read, and
 * the name, separated by tabs, then a last line {@code end <entries>}.
 * ZipInputStream itself fails on a stored entry whose bytes do not match the
 * CRC-32 of its local header; any exception exits non-zero.
 */
public class ZipCheck {
    public static void main(String[] args) throws IOException {
        if (args.length != 1) {
            System.err.println("usage: java ZipCheck.java <archive.zip>");
            System.exit(2);
        }
        PrintStream out = new PrintStream(
            new BufferedOutputStream(new FileOutputStream(FileDescriptor.out), 1 << 16),
            false, StandardCharsets.UTF_8);
        byte[] buffer = new byte[1 << 20];
        long entries = 0;
        try (ZipInputStream zip = new ZipInputStream(
                new BufferedInputStream(new FileInputStream(args[0]), 1 << 16),
                StandardCharsets.UTF_8)) {
            ZipEntry entry;
            while ((entry = zip.getNextEntry()) != null) {
                CRC32 crc = new CRC32();
                long size = 0;
                int n;
                while ((n = zip.read(buffer, 0, buffer.length)) > 0) {
                    crc.update(buffer, 0, n);
                    size += n;
                }
                out.printf("%08x\t%d\t%s%n", crc.getValue(), size, entry.getName());
                entries++;
            }
        }
        out.printf("end\t%d%n", entries);
        out.flush();
        if (out.checkError()) {
            System.exit(3);
        }
    }
}
