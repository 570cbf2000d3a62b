// Just enough of UnityEngine's API for tests/test_unity.py to compile Samples~ without Unity.
namespace UnityEngine
{
    public class Object { }
    public class Component : Object { }
    public class Behaviour : Component { }
    public class MonoBehaviour : Behaviour { }
    public sealed class SerializeField : System.Attribute { }
    public enum EventType { KeyDown }
    public enum KeyCode { Return }
    public sealed class Event
    {
        public static Event current;
        public EventType type;
        public KeyCode keyCode;
    }
    public sealed class GUILayoutOption { }
    public static class GUILayout
    {
        public static void Label(string text, params GUILayoutOption[] options) { }
        public static string TextField(string text, params GUILayoutOption[] options) { return text; }
        public static GUILayoutOption Width(float width) { return null; }
    }
    public static class Debug
    {
        public static void LogWarning(object message) { }
    }
}
